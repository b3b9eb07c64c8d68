"""The one-pass LRU curve, the Belady replay over ids and the policy replay agree with the real
``catalog.cache`` code request for request."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.cache.policies import LRU, make_policy
from catalog.cache.replay import replay, replay_belady
from catalog.plan.curves import replay_belady_ids, replay_policy
from catalog.plan.stack import lru_hits, lru_needs, stack_distances

traces = st.lists(st.tuples(st.integers(0, 12), st.integers(1, 40)), min_size=1, max_size=120)


def _as_requests(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Key ids and sizes, a key keeping the size of its first request."""
    first: dict[int, int] = {}
    ids = np.array([k for k, _ in pairs], dtype=np.int64)
    sizes = np.array([first.setdefault(k, s) for k, s in pairs], dtype=np.int64)
    return ids, sizes


@settings(max_examples=150, deadline=None)
@given(traces, st.lists(st.integers(40, 400), min_size=1, max_size=5))
def test_byte_capacities_match_the_lru_policy(
    pairs: list[tuple[int, int]], caps: list[int]
) -> None:
    ids, sizes = _as_requests(pairs)
    needs = lru_needs(stack_distances(ids, sizes), sizes, unit="bytes")
    hits, hit_bytes = lru_hits(needs, sizes, np.array(caps))
    trace = [(f"t/k{k}@1", int(s)) for k, s in zip(ids, sizes, strict=True)]
    for capacity, h, b in zip(caps, hits, hit_bytes, strict=True):
        expected = replay(trace, LRU(capacity))
        assert (expected.hits, expected.bytes_hit) == (h, b)


@settings(max_examples=150, deadline=None)
@given(traces)
def test_slot_capacities_match_the_lru_policy(pairs: list[tuple[int, int]]) -> None:
    ids, sizes = _as_requests(pairs)
    needs = lru_needs(stack_distances(ids, sizes), sizes, unit="slots")
    hits, _ = lru_hits(needs, sizes, np.arange(1, 15))
    for slots, h in zip(range(1, 15), hits, strict=True):
        assert replay([(str(k), 1) for k in ids], LRU(slots)).hits == h


def test_a_long_trace_matches_too() -> None:
    rng = np.random.default_rng(7)
    key_sizes = rng.integers(1, 1000, size=3000)
    ids = np.minimum(rng.zipf(1.3, size=40_000), 3000) - 1
    sizes = key_sizes[ids]
    needs = lru_needs(stack_distances(ids, sizes), sizes, unit="bytes")
    capacity = int(key_sizes.sum() // 20)
    hits, hit_bytes = lru_hits(needs, sizes, np.array([capacity]))
    expected = replay([(str(k), int(s)) for k, s in zip(ids, sizes, strict=True)], LRU(capacity))
    assert (expected.hits, expected.bytes_hit) == (hits[0], hit_bytes[0])
    assert 0 < expected.hits < len(ids)  # the capacity is neither everything nor nothing


@settings(max_examples=100, deadline=None)
@given(traces, st.integers(1, 200))
def test_belady_over_ids_is_replay_belady(pairs: list[tuple[int, int]], capacity: int) -> None:
    ids, sizes = _as_requests(pairs)
    expected = replay_belady([(str(k), int(s)) for k, s in zip(ids, sizes, strict=True)], capacity)
    assert replay_belady_ids(ids, sizes, sizes, capacity) == (expected.hits, expected.bytes_hit)


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "wtinylfu", "gdsf", "lrfu-size"])
def test_policy_replay_is_the_cache_replay(policy: str) -> None:
    rng = np.random.default_rng(3)
    key_sizes = rng.integers(1, 100, size=200)
    ids = np.minimum(rng.zipf(1.2, size=5000), 200) - 1
    trace = [(f"k{k}", int(key_sizes[k])) for k in ids]
    capacity = int(key_sizes.sum() // 8)
    expected = replay(trace, make_policy(policy, capacity))
    keys = [k for k, _ in trace]
    charged = [s for _, s in trace]
    got = replay_policy(keys, charged, charged, make_policy(policy, capacity))
    assert got == (expected.hits, expected.bytes_hit)


def test_warm_up_requests_are_replayed_but_not_counted() -> None:
    keys = ["a", "b", "a", "b"]
    sizes = [1, 1, 1, 1]
    assert replay_policy(keys, sizes, sizes, LRU(2), start=2) == (2, 2)
    ids = np.array([0, 1, 0, 1])
    assert replay_belady_ids(ids, np.ones(4, np.int64), np.ones(4, np.int64), 2, start=2) == (2, 2)
