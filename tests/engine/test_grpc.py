"""End to end through a real catalog server on a loopback port and the real gRPC client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.errors import IncompatibleAdapter, NotFound
from engine_plugin import ResidentEngine
from tests.engine.conftest import Arch, make_ids, rel_err
from tests.servers import RunningCatalog, running_catalog


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningCatalog]:
    with running_catalog(tmp_path / "root") as running:
        yield running


@pytest.fixture
def client(served: RunningCatalog) -> Iterator[CatalogClient]:
    with served.client() as c:
        yield c


def test_attach_serve_swap_and_report_over_grpc(
    llama: Arch, served: RunningCatalog, client: CatalogClient
) -> None:
    for name in ["t/qv-r8", "t/all-r4", "t/mlp-r16-rs"]:
        client.push(name, llama.packs[name], aliases=("serving",))
    engine = ResidentEngine(
        llama.fresh_base(), catalog=client, num_slots=3, max_rank=16, base_id=llama.base_id
    )
    with engine:
        engine.attach("t/qv-r8@serving")
        staged = engine.prefetch(["t/all-r4"])[0].result(timeout=60)
        assert staged.number == 1

        adapters = ["t/qv-r8", None, "t/all-r4", "t/mlp-r16-rs@1"]
        ids = make_ids(len(adapters), 6, seed=21)
        logits = engine.forward(ids, adapters).logits
        for row, adapter in enumerate(adapters):
            name = adapter.split("@")[0] if adapter else None
            expected = llama.reference_logits(name, ids[row : row + 1])[0]
            assert rel_err(logits[row], expected) <= 1e-4, (row, adapter)

        # The trainer exports a new revision and moves `serving`; the engine swaps.
        pushed = client.push("t/qv-r8", llama.packs["t/ko-r2-bf16"], aliases=("serving",))
        swapped = engine.attach("t/qv-r8@serving")
        assert swapped.digest == pushed.revision.digest and swapped.number == 2
        logits = engine.forward(ids[:2], ["t/qv-r8@serving", "t/qv-r8"]).logits
        expected = llama.reference_logits("t/ko-r2-bf16", ids[:1])[0]
        assert rel_err(logits[0], expected) <= 1e-4
        # A bare name means `latest` and stays bound where it was until attached itself: the
        # engine says which revision each reference serves.
        assert engine.stats()["bindings"] == {
            "t/qv-r8": "t/qv-r8@1",
            "t/qv-r8@serving": "t/qv-r8@2",
            "t/all-r4": "t/all-r4@1",
        }
        expected = llama.reference_logits("t/qv-r8", ids[1:2])[0]
        assert rel_err(logits[1], expected) <= 1e-4
        assert engine.attach("t/qv-r8").number == 2

        engine.flush_reports()
        (record,) = [e for e in served.catalog.engines() if e.engine_id == engine.engine_id]
        assert (record.base_id, record.num_slots, record.max_rank) == (llama.base_id, 3, 16)
        stats = engine.stats()
        assert record.gpu == {r["digest"] for r in stats["resident"]}
        assert record.host == set(engine.host.digests())
        assert str(swapped.digest) in record.gpu

        # The engine's tier counters reach `loracat cache stats` through the catalog.
        tiers = {t["tier"]: t for t in client.stats()["tiers"]}
        gpu, host = tiers["gpu"], tiers["host"]
        assert gpu["entries"] == len(record.gpu) and gpu["misses"] == stats["misses"]
        assert gpu["bytes_in"] == stats["bytes_moved"] > 0
        assert gpu["capacity_bytes"] == stats["slot_bytes"]
        assert 0 < gpu["bytes"] <= gpu["bytes_in"]
        assert host["bytes"] == stats["host"]["bytes"] > 0
        assert host["entries"] == stats["host"]["entries"]
        assert host["capacity_bytes"] == stats["host"]["budget_bytes"]
        assert host["bytes_in"] == stats["host"]["bytes_in"]


def test_refusals_over_grpc(llama: Arch, client: CatalogClient) -> None:
    from catalog.pack import import_peft_dir

    client.push("t/other", import_peft_dir(llama.dirs["t/qv-r8"], base_id="other-base"))
    engine = ResidentEngine(
        llama.fresh_base(), catalog=client, num_slots=2, max_rank=16, base_id=llama.base_id
    )
    with engine:
        with pytest.raises(IncompatibleAdapter, match="other-base"):
            engine.attach("t/other")
        with pytest.raises(NotFound):
            engine.forward(make_ids(1, 2), ["t/nobody"])
        assert engine.stats()["resident"] == []
