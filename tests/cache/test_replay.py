"""Trace replay: counters, Belady's reference on hand-computed traces, ``simulate``'s shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.cache.policies import DEFAULT_POLICY, LRU, POLICIES, make_policy
from catalog.cache.replay import (
    format_simulation,
    load_trace,
    next_uses,
    replay,
    replay_belady,
    simulate,
)
from catalog.cache.traces import Request, catalog_bytes, write_trace, zipf_trace
from catalog.errors import InvalidArgument


def equal_sized(keys: str, size: int = 10) -> list[Request]:
    """One-letter keys, all of one size: ``equal_sized("abca")``."""
    return [(key, size) for key in keys]


def test_next_uses() -> None:
    assert next_uses(list("ababc")) == [2, 3, 5, 5, 5]
    assert next_uses([]) == []


def test_belady_on_the_textbook_reference_string() -> None:
    # 1 2 3 4 1 2 5 1 2 3 4 5 with three frames: MIN faults 7 times, i.e. 5 hits.
    trace = equal_sized("123412512345")
    counters = replay_belady(trace, capacity_bytes=30)
    assert (counters.hits, counters.misses) == (5, 7)
    # With bypass, 4 and 5 are never cached (each is needed later than all of 1, 2, 3).
    assert counters.evictions == 0
    assert counters.refused == 4
    assert replay(trace, LRU(30)).hits == 2  # LRU: only "1 2" after "5" hit


def test_belady_keeps_what_a_loop_needs_while_lru_thrashes() -> None:
    trace = equal_sized("abcabc", size=4)
    assert replay(trace, LRU(8)).hits == 0
    belady = replay_belady(trace, 8)
    assert belady.hits == 2  # a and b stay; c is bypassed both times
    assert belady.bytes_hit == 8 and belady.bytes_requested == 24


def test_belady_with_variable_sizes_evicts_the_farthest_next_use() -> None:
    trace: list[Request] = [("a", 6), ("b", 4), ("c", 4), ("b", 4), ("c", 4), ("a", 6)]
    counters = replay_belady(trace, 10)
    # c (next at 4) needs 4 bytes: a (next at 5) is farther than c, so a goes, not b (next 3).
    assert counters.evictions == 1
    assert counters.hits == 2  # b and c; a is not cached again (never used after)
    assert counters.byte_hit_rate == pytest.approx(8 / 28)


def test_belady_bypasses_an_item_needed_later_than_all_it_would_displace() -> None:
    trace: list[Request] = [("a", 6), ("b", 4), ("c", 5), ("a", 6), ("b", 4), ("c", 5)]
    counters = replay_belady(trace, 10)
    assert (counters.hits, counters.evictions, counters.refused) == (2, 0, 2)


def test_belady_refuses_items_larger_than_the_cache() -> None:
    counters = replay_belady([("big", 11), ("big", 11)], 10)
    assert (counters.hits, counters.refused) == (0, 2)


@settings(max_examples=80, deadline=None)
@given(
    keys=st.lists(st.integers(0, 12), min_size=1, max_size=200),
    slots=st.integers(1, 8),
)
def test_with_equal_sizes_no_policy_beats_belady(keys: list[int], slots: int) -> None:
    """With equal sizes the reference is Belady's MIN, which is optimal: an exact check."""
    trace = [(f"k{key}", 7) for key in keys]
    best = replay_belady(trace, 7 * slots).hits
    for name in POLICIES:
        assert replay(trace, make_policy(name, 7 * slots)).hits <= best, name


def test_replay_counts_hits_misses_bytes_evictions_and_refusals() -> None:
    trace: list[Request] = [("a", 4), ("b", 4), ("a", 4), ("c", 4), ("b", 4), ("huge", 20)]
    counters = replay(trace, LRU(8))
    # a b | a hit | c evicts b | b evicts a | huge refused
    assert counters.requests == 6
    assert counters.hits == 1
    assert counters.misses == 5
    assert counters.bytes_requested == 40
    assert counters.bytes_hit == 4
    assert counters.evictions == 2
    assert counters.refused == 1
    assert counters.hit_rate == pytest.approx(1 / 6)
    assert counters.byte_hit_rate == pytest.approx(0.1)
    assert counters.to_json()["misses"] == 5


def check_rates(section: dict[str, float]) -> None:
    assert set(section) >= {"hit_rate", "byte_hit_rate"}
    for value in (section["hit_rate"], section["byte_hit_rate"]):
        assert isinstance(value, float) and 0.0 <= value <= 1.0


def test_simulate_returns_the_documented_shape(
    tmp_path: Path, small_catalog: list[Request]
) -> None:
    trace = zipf_trace(small_catalog, 3000, s=0.9, seed=4)
    path = tmp_path / "zipf.trace"
    write_trace(path, trace)
    capacity = sum(size for _, size in small_catalog) // 20
    result = simulate(path, "default", capacity)
    assert result["policy"] == DEFAULT_POLICY
    assert result["requested_policy"] == "default"
    check_rates(result)
    check_rates(result["lru"])
    check_rates(result["belady"])
    assert result["requests"] == 3000
    assert result["capacity_bytes"] == capacity
    assert result["unique_keys"] == len(dict(trace))
    assert result["catalog_bytes"] == sum(dict(trace).values())
    assert result["evictions"] >= 0
    json.dumps(result)  # the CLI prints it with --json
    # The same trace given as an iterable gives the same figures.
    assert simulate(iter(trace), DEFAULT_POLICY, capacity)["hit_rate"] == result["hit_rate"]
    lru = simulate(trace, "lru", capacity)
    assert lru["hit_rate"] == lru["lru"]["hit_rate"] == result["lru"]["hit_rate"]
    # A frequency-aware default does better than LRU on a Zipf load.
    assert result["hit_rate"] > result["lru"]["hit_rate"]


def test_format_simulation_is_a_small_table(small_catalog: list[Request]) -> None:
    trace = zipf_trace(small_catalog, 2000, s=1.0, seed=5)
    result = simulate(trace, "s3fifo", catalog_bytes(trace) // 10)
    text = format_simulation(result)
    lines = text.splitlines()
    assert lines[0].startswith("policy s3fifo, capacity ")
    assert "10.0% of" in lines[0] and "2000 requests" in lines[0]
    assert [line.split()[0] for line in lines[2:5]] == ["s3fifo", "lru", "belady"]
    assert f"{result['hit_rate']:.2%}" in lines[2]
    assert "of Belady's hit rate" in lines[-1]
    assert "(as default)" in format_simulation(simulate(trace, "default", 10**10))


def test_simulate_refuses_bad_arguments(tmp_path: Path) -> None:
    trace = equal_sized("abc")
    with pytest.raises(InvalidArgument, match="unknown eviction policy"):
        simulate(trace, "fifo", 100)
    with pytest.raises(InvalidArgument, match="capacity"):
        simulate(trace, "lru", 0)
    with pytest.raises(InvalidArgument, match="no requests"):
        simulate([], "lru", 100)
    with pytest.raises(InvalidArgument, match="cannot read trace"):
        simulate(tmp_path / "missing.trace", "lru", 100)


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([("a", 1), ("a", 2)], "request 2: a has size 2, earlier 1"),
        ([("a", 0)], "request 1: size 0"),
        ([("a", 1.5)], "request 1: size 1.5"),
        ([("", 3)], "request 1: key ''"),
        ([("a",)], "request 1 is not a \\(key, size\\) pair"),
    ],
)
def test_load_trace_checks_iterables(requests: list[Request], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_trace(requests)
