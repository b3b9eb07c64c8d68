"""The host tier, the prefetcher and what the engine tells its catalog."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from catalog.errors import IncompatibleAdapter, NotFound
from engine_plugin import LocalPackSource, ResidentEngine
from tests.engine.conftest import Arch, make_ids, rel_err


def test_prefetch_stages_in_host_memory_without_taking_slots(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source)
    futures = engine.prefetch(["t/qv-r8", "t/all-r4"])
    revisions = [f.result(timeout=60) for f in futures]
    assert [str(r.adapter) for r in revisions] == ["t/qv-r8", "t/all-r4"]
    stats = engine.stats()
    assert stats["resident"] == [] and stats["host"]["entries"] == 2
    assert stats["prefetch"] == {"submitted": 2, "completed": 2, "failed": 0}
    fetched = source.fetches

    ids = make_ids(2, 3)
    logits = engine.forward(ids, ["t/qv-r8", "t/all-r4"]).logits
    assert source.fetches == fetched  # served from host memory
    assert engine.stats()["host"]["hits"] == 2
    assert rel_err(logits[1], llama.reference_logits("t/all-r4", ids[1:])[0]) <= 1e-4


def test_prefetch_errors_surface_in_futures(llama: Arch) -> None:
    engine = llama.engine(max_rank=4)
    missing, too_big = engine.prefetch(["t/missing", "t/qv-r8"])
    with pytest.raises(NotFound):
        missing.result(timeout=60)
    with pytest.raises(IncompatibleAdapter):
        too_big.result(timeout=60)
    assert engine.stats()["prefetch"]["failed"] == 2


def test_host_budget_evicts_least_recently_used(llama: Arch) -> None:
    source = llama.source()
    probe = llama.engine(source)
    for name in ["t/qv-r8", "t/all-r4"]:
        probe.prefetch([name])[0].result(timeout=60)
    budget = probe.stats()["host"]["bytes"]  # exactly the two packs
    engine = llama.engine(source, host_budget_bytes=budget)
    for name in ["t/qv-r8", "t/all-r4"]:
        engine.prefetch([name])[0].result(timeout=60)
    engine.forward(make_ids(1, 2), ["t/qv-r8"])  # touch t/qv-r8 in host memory
    engine.prefetch(["t/ko-r2-bf16"])[0].result(timeout=60)
    host = engine.stats()["host"]
    held = {str(staged.revision.adapter) for staged in map(engine.host.peek, engine.host.digests())}
    assert "t/all-r4" not in held and "t/qv-r8" in held
    assert host["evictions"] >= 1 and host["bytes"] <= host["budget_bytes"]


def test_pack_larger_than_budget_still_attaches(llama: Arch) -> None:
    engine = llama.engine(host_budget_bytes=16)
    ids = make_ids(1, 3)
    logits = engine.forward(ids, ["t/mlp-r16-rs"]).logits
    assert rel_err(logits[0], llama.reference_logits("t/mlp-r16-rs", ids)[0]) <= 1e-4
    assert engine.stats()["host"]["entries"] == 0


def test_concurrent_requests_fetch_once(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source)
    futures = engine.prefetch(["t/qv-r8"] * 4) + engine.prefetch(["t/qv-r8@1"])
    for future in futures:
        future.result(timeout=60)
    assert source.fetches == 1


def test_registers_and_reports_residency(make_engine: Callable[..., ResidentEngine]) -> None:
    source = LocalPackSource()
    engine = make_engine(source, num_slots=3, max_rank=16)
    assert source.registrations == [(engine.engine_id, "tiny-llama", 3, 16)]


def test_residency_reports_follow_changes(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source, num_slots=2)
    engine.attach("t/qv-r8")
    engine.prefetch(["t/all-r4"])[0].result(timeout=60)
    engine.flush_reports()
    _, gpu, host = source.reports[-1]
    assert gpu == [str(source.resolve("t/qv-r8").digest)]
    assert sorted(host) == sorted(str(source.resolve(n).digest) for n in ["t/qv-r8", "t/all-r4"])
    engine.detach("t/qv-r8")
    engine.flush_reports()
    assert source.reports[-1][1] == []
    assert engine.stats()["residency_reports"]["failed"] == 0


def test_stats_has_the_documented_keys(make_engine: Callable[..., ResidentEngine]) -> None:
    engine = make_engine()
    engine.forward(make_ids(2, 2), ["t/qv-r8", "t/qv-r8"])
    engine.forward(make_ids(1, 2), ["t/qv-r8"])
    stats = engine.stats()
    for key in ["num_slots", "resident", "hits", "misses", "evictions", "bytes_moved"]:
        assert key in stats
    assert stats["misses"] == 1 and stats["hits"] == 1
    (entry,) = stats["resident"]
    assert entry["digest"].startswith("sha256:") and entry["ref"] == "t/qv-r8@1"
    assert stats["bytes_moved"] == engine.host.peek(entry["digest"]).nbytes


def test_prefetch_of_a_bound_name_stages_the_catalogs_new_revision(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source, num_slots=2)
    engine.attach("t/qv-r8")
    source.publish("t/qv-r8", llama.packs["t/all-r4"])
    (future,) = engine.prefetch(["t/qv-r8"])
    assert future.result(timeout=60).number == 2
    fetches = source.fetches
    engine.attach("t/qv-r8")  # the swap finds revision 2 in host memory
    assert source.fetches == fetches
