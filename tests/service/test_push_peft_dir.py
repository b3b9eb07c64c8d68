"""``CatalogClient.push_peft_dir``: a PEFT directory imported and pushed in one call, written
straight into the catalog's inbox on its host, streamed elsewhere; the same revision either
way, and what import refuses is refused before any RPC."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.client import local_push as client_side
from catalog.errors import InvalidPack
from catalog.pack import PEFT_WEIGHTS_FILE, import_peft_dir
from tests.servers import RunningCatalog
from tests.service.conftest import BASE_ID


def _inbox_files(served: RunningCatalog) -> list[Path]:
    inbox = served.root / "inbox"
    # the warm files the catalog keeps there (catalog.warm_inbox) are not a push's leftovers
    return [p for p in inbox.iterdir() if not p.name.startswith("warm-")] if inbox.exists() else []


def test_a_peft_dir_is_written_into_the_inbox_and_is_the_imported_pack(  # type: ignore[no-untyped-def]
    served, adapter_dirs
):
    directory = adapter_dirs["all-r8"]
    expected = import_peft_dir(directory, base_id=BASE_ID)
    seen: list[tuple[int, int]] = []
    with CatalogClient(served.address) as client:
        pushed = client.push_peft_dir(
            "acme/direct",
            directory,
            base_id=BASE_ID,
            aliases=["prod"],
            metadata={"k": "v"},
            progress=lambda done, total: seen.append((done, total)),
        )
        assert pushed.created and client._inbox is not None
        assert client._inbox.counters == {"pushes": 1, "fallbacks": 0, "warm": 0}
        assert bytes(client.fetch("acme/direct@prod")) == expected
        assert client.resolve("acme/direct").metadata["k"] == "v"
        # The bytes pushed the usual way are the same revision.
        assert not client.push("acme/direct", expected, base_id=BASE_ID).created
    assert seen == [(len(expected), len(expected))]
    assert _inbox_files(served) == []
    assert served.catalog.stats()["counters"]["nvme_admitted_at_push"] == 1


@pytest.mark.parametrize("colocated", [False, True])
def test_streamed_when_not_colocated_or_on_another_host(  # type: ignore[no-untyped-def]
    served, adapter_dirs, monkeypatch, colocated
):
    if colocated:  # a client that asks, but runs "elsewhere"
        monkeypatch.setattr(client_side, "host_id", lambda: "elsewhere/boot")
    directory = adapter_dirs["down-r2"]
    with CatalogClient(served.address, colocated=colocated) as client:
        pushed = client.push_peft_dir("acme/streamed", directory, base_id=BASE_ID)
        assert pushed.created
        assert bytes(client.fetch("acme/streamed")) == import_peft_dir(directory, base_id=BASE_ID)
        if colocated:
            assert client._inbox is not None and client._inbox.counters["pushes"] == 0
    assert _inbox_files(served) == []


def test_an_inbox_that_cannot_be_written_falls_back_to_the_stream_once(  # type: ignore[no-untyped-def]
    served, adapter_dirs, monkeypatch
):
    def full_disk(path: Path, source: object) -> None:
        path.touch()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(client_side, "_write_new", full_disk)
    directory = adapter_dirs["qv-r4"]
    with CatalogClient(served.address) as client:
        assert client.push_peft_dir("acme/fallback", directory, base_id=BASE_ID).created
        assert client._inbox is not None
        assert client._inbox.counters == {"pushes": 0, "fallbacks": 1, "warm": 0}
        assert bytes(client.fetch("acme/fallback")) == import_peft_dir(directory, base_id=BASE_ID)
    assert _inbox_files(served) == []


def test_a_bad_adapter_is_refused_before_any_rpc(served, adapter_dirs, tmp_path):  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["qv-r4"], broken)
    weights = broken / PEFT_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-3])
    with CatalogClient(served.address) as client:
        with pytest.raises(InvalidPack, match=PEFT_WEIGHTS_FILE):
            client.push_peft_dir("acme/broken", broken, base_id=BASE_ID)
        with pytest.raises(InvalidPack, match="does not exist"):
            client.push_peft_dir("acme/broken", tmp_path / "missing", base_id=BASE_ID)
        assert client._inbox is not None and not client._inbox._decided  # never asked
        assert client.list_adapters().items == ()
    assert _inbox_files(served) == []


def test_the_async_client_imports_and_streams(served, adapter_dirs):  # type: ignore[no-untyped-def]
    import asyncio

    from catalog.client import AsyncCatalogClient

    directory = adapter_dirs["qv-r4"]

    async def push() -> str:
        async with AsyncCatalogClient(served.address) as client:
            result = await client.push_peft_dir("acme/async", directory, base_id=BASE_ID)
            return result.revision.digest

    digest = asyncio.run(push())
    with CatalogClient(served.address) as client:
        assert client.resolve("acme/async").digest == digest
        assert bytes(client.fetch("acme/async")) == import_peft_dir(directory, base_id=BASE_ID)
