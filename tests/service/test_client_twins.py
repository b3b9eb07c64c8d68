"""The asyncio client against a real catalog, beside the sync one: the verbs that
``tests/registry/test_registry_sdk.py``'s parity test leaves out (pushes, packs on disk, the NVMe
tier, deletes, the request record, engines) answer alike, and both refuse bad input with the
same exception and message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from catalog.client import AsyncCatalogClient, CatalogClient
from catalog.errors import (
    Conflict,
    InvalidArgument,
    InvalidName,
    InvalidReference,
    NotFound,
    Unavailable,
)
from tests.servers import RunningCatalog, free_port


def test_async_client_pushes_fetches_and_reports_like_the_sync_one(
    client: CatalogClient, served: RunningCatalog, packs: dict[str, bytes], tmp_path: Path
) -> None:
    data = packs["qv-r4"]
    pushed = client.push("acme/sync", data)
    client.fetch_to("acme/sync", tmp_path / "sync.pack")

    async def run() -> dict[str, object]:
        async with AsyncCatalogClient(served.address) as aio:
            seen: list[tuple[int, int]] = []
            result = await aio.push("acme/aio", data, progress=lambda *p: seen.append(p))
            again = await aio.push("acme/aio", data)
            fetched = await aio.fetch_to("acme/aio", tmp_path / "aio.pack")
            pinned = await aio.pin_pack("acme/aio")
            unpinned = await aio.unpin_pack("acme/aio")
            evicted = await aio.evict_pack("acme/aio")
            await aio.register_engine("engine-aio", "tiny-llama-test", 4, 16)
            await aio.report_residency(
                "engine-aio",
                gpu=[str(result.revision.digest)],
                host=[],
                tiers=[{"tier": "gpu", "bytes": 100, "hits": 3}],
            )
            return {
                "created": (result.created, again.created),
                "same revision": again.revision == result.revision,
                "progress": seen[-1],
                "fetched": fetched == result.revision,
                "tier moves": {pinned, unpinned, evicted} == {result.revision},
                "digest": result.revision.digest,
                "records": await aio.export_requests(engine="nobody"),
                "reindex": sorted(await aio.reindex()),
                "checkpoint": sorted(await aio.checkpoint()),
                "deleted": await aio.delete("acme/aio", all_revisions=True, force=True),
            }

    got = asyncio.run(run())
    assert got == {
        "created": (True, False),
        "same revision": True,
        "progress": (len(data), len(data)),
        "fetched": True,
        "tier moves": True,
        "digest": pushed.revision.digest,
        "records": client.export_requests(engine="nobody"),
        "reindex": sorted(client.reindex()),
        "checkpoint": sorted(client.checkpoint()),
        "deleted": [1],
    }
    assert (tmp_path / "aio.pack").read_bytes() == (tmp_path / "sync.pack").read_bytes() == data
    gpu = next(t for t in client.stats()["tiers"] if t["tier"] == "gpu")
    assert (gpu["bytes"], gpu["hits"]) == (100, 3)
    # The request record holds the async client's resolves and fetches as it does the sync's.
    kinds = {(r["kind"], r["ref"].split("@")[0]) for r in client.export_requests()}
    assert {("fetch", "acme/aio"), ("fetch", "acme/sync")} <= kinds


def test_async_client_refuses_what_the_sync_one_refuses(
    client: CatalogClient, served: RunningCatalog, packs: dict[str, bytes]
) -> None:
    client.push("acme/r", packs["qv-r4"], aliases=["serving"])

    def refusals_sync() -> list[str]:
        refused = []
        for call in (
            lambda: client.resolve("acme/missing"),
            lambda: client.set_alias("acme/r", "serving", 1, expected=7),
            lambda: client.list_revisions("Not A Name"),
            lambda: client.fetch("acme/r", offset=-1),
            lambda: client.pin_pack("acme/r@"),
            lambda: client.report_residency("e", gpu=["no-digest"], host=[]),
        ):
            with pytest.raises(
                (NotFound, Conflict, InvalidName, InvalidArgument, InvalidReference)
            ) as caught:
                call()
            refused.append(f"{type(caught.value).__name__}: {caught.value}")
        with pytest.raises(NotFound) as unregistered:
            list(client.watch_hints("nobody"))
        return [*refused, f"NotFound: {unregistered.value}"]

    async def refusals_async() -> list[str]:
        refused = []
        async with AsyncCatalogClient(served.address) as aio:
            for call in (
                lambda: aio.resolve("acme/missing"),
                lambda: aio.set_alias("acme/r", "serving", 1, expected=7),
                lambda: aio.list_revisions("Not A Name"),
                lambda: aio.fetch("acme/r", offset=-1),
                lambda: aio.pin_pack("acme/r@"),
                lambda: aio.report_residency("e", gpu=["no-digest"], host=[]),
            ):
                with pytest.raises(
                    (NotFound, Conflict, InvalidName, InvalidArgument, InvalidReference)
                ) as caught:
                    await call()
                refused.append(f"{type(caught.value).__name__}: {caught.value}")
            with pytest.raises(NotFound) as unregistered:
                async for _ in aio.watch_hints("nobody"):
                    pass
        return [*refused, f"NotFound: {unregistered.value}"]

    expected = refusals_sync()
    assert [text.split(":")[0] for text in expected] == [
        "NotFound",
        "Conflict",
        "InvalidName",
        "InvalidArgument",
        "InvalidReference",
        "InvalidReference",
        "NotFound",
    ]
    assert asyncio.run(refusals_async()) == expected


def test_both_clients_say_alike_that_no_catalog_answers() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def wait_async() -> str:
        async with AsyncCatalogClient(address) as aio:
            with pytest.raises(Unavailable) as caught:
                await aio.wait_ready(0.3)
            return str(caught.value)

    with CatalogClient(address, colocated=False) as client, pytest.raises(Unavailable) as caught:
        client.wait_ready(0.3)
    assert asyncio.run(wait_async()) == str(caught.value) == f"catalog at {address} is unavailable"
