"""Trace files (reader, writer, errors) and the synthetic workload generators."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from catalog.cache.traces import (
    Request,
    catalog_bytes,
    mixed_trace,
    parse_trace_lines,
    read_trace,
    scan_trace,
    shift_trace,
    synthetic_catalog,
    write_trace,
    zipf_trace,
)
from catalog.errors import InvalidArgument

MiB = 1024 * 1024


def test_write_then_read_round_trips(tmp_path: Path, small_catalog: list[Request]) -> None:
    trace = zipf_trace(small_catalog, 500, s=1.0, seed=1)
    path = tmp_path / "t.trace"
    assert write_trace(path, trace, comment="zipf s=1.0\nseed 1") == 500
    text = path.read_text()
    assert text.startswith("# zipf s=1.0\n# seed 1\n")
    assert read_trace(path) == trace
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace"]


def test_comments_and_blank_lines_are_ignored() -> None:
    lines = ["# header", "", "acme/bot@3 100", "   ", "  # indented comment", "acme/bot@3 100"]
    assert parse_trace_lines(lines) == [("acme/bot@3", 100), ("acme/bot@3", 100)]


def test_every_reference_form_is_a_key() -> None:
    digest = "sha256:" + "ab" * 32
    lines = ["acme/bot 1", "acme/bot@serving 2", "acme/bot@7 3", f"acme/bot@{digest} 4"]
    keys = [key for key, _ in parse_trace_lines(lines)]
    assert keys == ["acme/bot", "acme/bot@serving", "acme/bot@7", f"acme/bot@{digest}"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("acme/bot@3", "line 3: expected 'tenant/name@rev SIZE_BYTES'"),
        ("acme/bot@3 10 extra", "line 3: expected"),
        ("acme/bot@3 0", "line 3: size '0' is not a positive integer"),
        ("acme/bot@3 -5", "line 3: size '-5'"),
        ("acme/bot@3 1e6", "line 3: size '1e6'"),
        ("acme/bot@3 ١٢", "line 3: size"),
        ("Acme/bot@3 10", "line 3: .*invalid tenant 'Acme'"),
        ("acme@3 10", "line 3: .*expected tenant/name"),
        ("acme/bot@3 999", "line 3: acme/bot@3 has size 999 but line 1 gave 100"),
    ],
)
def test_a_bad_line_is_refused_with_its_number(bad: str, message: str) -> None:
    lines = ["acme/bot@3 100", "# fine", bad]
    with pytest.raises(InvalidArgument, match=message):
        parse_trace_lines(lines)


def test_read_trace_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.trace"
    path.write_text("acme/bot@1 10\nnonsense\n")
    with pytest.raises(InvalidArgument, match=f"trace {path} line 2"):
        read_trace(path)
    path.write_bytes(b"acme/bot@1 10\n\xff\xfe\n")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        read_trace(path)
    with pytest.raises(InvalidArgument, match="cannot read trace"):
        read_trace(tmp_path / "absent.trace")


def test_write_trace_leaves_nothing_on_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with pytest.raises(InvalidArgument, match="request 2: size 0"):
        write_trace(path, [("a/b@1", 5), ("a/b@2", 0)])
    with pytest.raises(InvalidArgument, match="request 1: key 'a b'"):
        write_trace(path, [("a b", 5)])
    assert list(tmp_path.iterdir()) == []


def test_synthetic_catalog_has_realistic_lora_sizes() -> None:
    catalog = synthetic_catalog(5000, seed=3)
    keys = [key for key, _ in catalog]
    assert len(set(keys)) == 5000
    parse_trace_lines(f"{key} {size}" for key, size in catalog)  # every key is a valid ref
    sizes = [size for _, size in catalog]
    assert 3 * MiB < min(sizes) < 4 * MiB  # rank 8, attention only
    assert 80 * MiB < max(sizes) < 90 * MiB  # rank 64, attention + MLP
    assert 8 * MiB < sum(sizes) / len(sizes) < 25 * MiB
    assert catalog_bytes(catalog + catalog) == sum(sizes)


def test_generators_are_deterministic_per_seed(small_catalog: list[Request]) -> None:
    for generate in (zipf_trace, shift_trace, scan_trace, mixed_trace):
        first = generate(small_catalog, 2000, seed=11)
        assert first == generate(small_catalog, 2000, seed=11)
        assert first != generate(small_catalog, 2000, seed=12)
        assert len(first) == 2000
    assert synthetic_catalog(50, seed=1) == synthetic_catalog(50, seed=1)


def test_zipf_popularity_is_skewed(small_catalog: list[Request]) -> None:
    counts = Counter(key for key, _ in zipf_trace(small_catalog, 20_000, s=1.0, seed=2))
    ranked = [count for _, count in counts.most_common()]
    # P(rank 1) / P(rank 10) = 10 for s = 1.
    assert 6 < ranked[0] / ranked[9] < 15
    flat = Counter(key for key, _ in zipf_trace(small_catalog, 20_000, s=0.0, seed=2))
    assert max(flat.values()) < 3 * 20_000 / len(small_catalog)


def test_shift_moves_the_hot_set(small_catalog: list[Request]) -> None:
    trace = shift_trace(small_catalog, 20_000, s=1.0, phases=2, seed=3)
    first = {key for key, _ in Counter(trace[:10_000]).most_common(10)}
    second = {key for key, _ in Counter(trace[10_000:]).most_common(10)}
    assert len(first & second) <= 2


def test_scan_sweeps_each_cold_adapter_once(small_catalog: list[Request]) -> None:
    trace = scan_trace(small_catalog, 10_000, s=0.9, scan_share=0.25, scan_start=0.5, seed=4)
    cold = {key for key, _ in small_catalog[300:]}
    swept = [position for position, (key, _) in enumerate(trace) if key in cold]
    assert len(swept) == len(cold) == 100
    assert {trace[p][0] for p in swept} == cold
    assert swept[0] >= 0.45 * len(trace)
    # Mixed with the load, not one solid block.
    assert swept[-1] - swept[0] > 1.5 * len(cold)


def test_mix_has_phases_and_a_sweep(small_catalog: list[Request]) -> None:
    trace = mixed_trace(small_catalog, 30_000, s=0.9, seed=5)
    counts = Counter(key for key, _ in trace)
    once = [key for key, count in counts.items() if count == 1]
    assert len(once) >= len(small_catalog) // 6 - 5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: zipf_trace([], 10), "catalog is empty"),
        (lambda c: zipf_trace(c, 0), "num_requests must be positive"),
        (lambda c: zipf_trace(c, 10, s=-1), "Zipf parameter"),
        (lambda c: shift_trace(c, 10, phases=0), "phases"),
        (lambda c: scan_trace(c, 10, scan_share=1.5), "scan_share"),
        (lambda c: scan_trace(c, 50, scan_share=0.5), "does not fit"),
        (lambda c: synthetic_catalog(0), "positive"),
    ],
)
def test_generator_arguments_are_checked(
    call: object, message: str, small_catalog: list[Request]
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        call(small_catalog)  # type: ignore[operator]
