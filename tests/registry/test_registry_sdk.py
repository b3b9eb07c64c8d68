"""What a registry user relies on, through the SDK over real gRPC: guarded deletes, alias moves
by number/alias/digest, rollback that walks back, metadata edits, provenance, filtered listings,
and the asyncio client's parity with the sync one."""

from __future__ import annotations

import asyncio
import inspect
import socket

import pytest

from catalog.client import AsyncCatalogClient, CatalogClient
from catalog.digest import Digest
from catalog.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from catalog.model import PushProvenance


def test_rm_all_refuses_while_an_alias_points_in_unless_forced(client, packs):
    client.push("acme/g", packs["qv-r4"], aliases=["serving"])
    client.push("acme/g", packs["all-r8"])
    with pytest.raises(FailedPrecondition, match="serving->1"):
        client.delete("acme/g", all_revisions=True)
    assert [r.number for r in client.iter_revisions("acme/g")] == [1, 2]
    assert client.delete("acme/g", all_revisions=True, force=True) == [1, 2]
    with pytest.raises(NotFound):
        client.resolve("acme/g@serving")


def test_alias_moves_by_number_alias_and_digest(client, packs):
    one = client.push("acme/m", packs["qv-r4"], aliases=["canary"]).revision
    two = client.push("acme/m", packs["all-r8"]).revision
    assert client.set_alias("acme/m", "serving", "canary").revision == one.number
    assert client.set_alias("acme/m", "serving", str(two.digest)).revision == two.number
    assert client.set_alias("acme/m", "serving", f"sha256:{one.digest.hex[:12]}").revision == 1
    assert client.set_alias("acme/m", "serving", "2").revision == 2
    assert client.set_alias("acme/m", "serving", "1").revision == 1
    assert client.set_alias("acme/m", "serving", "latest", expected=1).revision == 2
    with pytest.raises(Conflict):
        client.set_alias("acme/m", "serving", "canary", expected=1)
    with pytest.raises(NotFound, match="nope"):
        client.set_alias("acme/m", "serving", "nope")
    with pytest.raises(NotFound):
        client.set_alias("acme/m", "serving", f"sha256:{'0' * 16}")
    with pytest.raises(InvalidArgument):
        client.set_alias("acme/m", "serving", "Bad Name")


def test_repeated_rollback_walks_back_and_to_jumps(client, packs):
    for key in ("qv-r4", "all-r8", "down-r2"):
        client.push("acme/rb", packs[key])
    for number in (1, 2, 3):
        client.set_alias("acme/rb", "serving", number)
    assert client.rollback("acme/rb", "serving").revision == 2
    assert client.rollback("acme/rb", "serving").revision == 1
    with pytest.raises(FailedPrecondition, match="no earlier revision"):
        client.rollback("acme/rb", "serving")
    assert client.rollback("acme/rb", "serving", to=3).revision == 3
    # the jump is a move like any other: rolling back returns to where it came from
    assert client.rollback("acme/rb", "serving").revision == 1
    assert client.rollback("acme/rb", "serving", to="latest").revision == 3
    # a rollback never overwrites a move it did not see
    with pytest.raises(Conflict):
        client.rollback("acme/rb", "serving", expected=2)
    client.delete("acme/rb@1")
    with pytest.raises(FailedPrecondition, match="revision 1 was deleted"):
        client.rollback("acme/rb", "serving")
    with pytest.raises(NotFound):
        client.rollback("acme/rb", "never-set")


def test_metadata_set_remove_and_reserved_keys(client, packs):
    client.push("acme/md", packs["qv-r4"], metadata={"team": "a"})
    updated = client.set_metadata("acme/md", {"description": "first try", "stage": "dev"})
    assert updated.metadata["description"] == "first try"
    removed = client.set_metadata("acme/md@1", remove=["stage", "absent"])
    assert "stage" not in removed.metadata and removed.metadata["team"] == "a"
    with pytest.raises(InvalidArgument, match="no keys"):
        client.set_metadata("acme/md")
    with pytest.raises(InvalidArgument, match="reserved"):
        client.set_metadata("acme/md", {"provenance.principal": "mallory"})
    with pytest.raises(InvalidArgument, match="reserved"):
        client.set_metadata("acme/md", remove=["provenance.host"])
    with pytest.raises(InvalidArgument, match="both set and removed"):
        client.set_metadata("acme/md", {"x": "1"}, remove=["x"])
    with pytest.raises(InvalidArgument, match="reserved"):
        client.push("acme/md2", packs["qv-r4"], metadata={"provenance.run_id": "forged"})


def test_provenance_is_recorded_and_survives_reindex(client, packs):
    parent = client.push("acme/base-policy", packs["qv-r4"]).revision
    data = Digest.of(b"the training set")
    child = client.push(
        "acme/child",
        packs["all-r8"],
        provenance=PushProvenance(
            run_id="run-42", parent="acme/base-policy", data_digest=str(data), eval={"acc": "0.9"}
        ),
    ).revision
    expected = {
        "provenance.principal": "anonymous",
        "provenance.host": socket.gethostname(),
        "provenance.run_id": "run-42",
        "provenance.parent": "acme/base-policy@1",
        "provenance.parent_digest": str(parent.digest),
        "provenance.data_digest": str(data),
        "eval.acc": "0.9",
    }
    assert child.metadata == expected
    client.reindex()
    assert client.resolve("acme/child").metadata == expected
    found = list(client.iter_adapters(tags={"provenance.run_id": "run-42"}))
    assert [str(a.adapter) for a in found] == ["acme/child"]
    with pytest.raises(NotFound):
        client.push("acme/c2", packs["qv-r4"], provenance=PushProvenance(parent="acme/nope"))
    with pytest.raises(InvalidArgument):
        client.push("acme/c2", packs["qv-r4"], provenance=PushProvenance(data_digest="md5:xx"))


def test_listing_filters_answered_by_the_server(client, packs, served):
    from catalog.pack import read_pack, write_pack

    def rebased(data: bytes, base: str) -> bytes:
        pack = read_pack(data)
        tensors = {name: pack.tensor(name) for name in pack.tensor_names()}
        return write_pack(pack.manifest.with_base_id(base), tensors)

    client.push("acme/a", rebased(packs["qv-r4"], "base-1"), metadata={"task": "chat"})
    client.push("acme/b", rebased(packs["qv-r4"], "base-2"), metadata={"task": "chat"})
    client.push("acme/c", rebased(packs["down-r2"], "base-1"), aliases=["serving"])
    client.push("other/d", rebased(packs["all-r8"], "base-1"), metadata={"task": "sql"})

    def names(**filters: object) -> list[str]:
        return [str(a.adapter) for a in client.iter_adapters(**filters)]

    assert names(base_id="base-1") == ["acme/a", "acme/c", "other/d"]
    assert names(tags={"task": "chat"}) == ["acme/a", "acme/b"]
    assert names(base_id="base-1", tags={"task": "chat"}) == ["acme/a"]
    assert names(alias="serving") == ["acme/c"]
    assert client.iter_adapters("acme", base_id="base-1") is not None
    assert [str(a.adapter) for a in client.iter_adapters("acme", base_id="base-1")] == [
        "acme/a",
        "acme/c",
    ]
    first = client.list_adapters(base_id="base-1", page_size=1)
    assert [str(a.adapter) for a in first.items] == ["acme/a"] and first.next_token
    second = client.list_adapters(base_id="base-1", page_size=1, page_token=first.next_token)
    assert [str(a.adapter) for a in second.items] == ["acme/c"]
    with pytest.raises(InvalidArgument):
        client.list_adapters(alias="Not An Alias")


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_async_client_has_every_method_of_the_sync_client():
    sync, aio = public_methods(CatalogClient), public_methods(AsyncCatalogClient)
    assert sorted(set(sync) - set(aio)) == []
    for name, signature in sync.items():
        # same parameters, same defaults (the async twin may add none of its own)
        assert list(aio[name].parameters) == list(signature.parameters), name
        for param in signature.parameters.values():
            assert aio[name].parameters[param.name].default == param.default, (name, param.name)


def test_async_client_answers_like_the_sync_one(client, served, packs):
    client.push("acme/as", packs["qv-r4"], aliases=["serving"])
    client.push("acme/as", packs["all-r8"])

    async def run() -> dict[str, object]:
        async with AsyncCatalogClient(served.address) as aio:
            await aio.wait_ready(5)
            await aio.set_alias("acme/as", "serving", "latest")
            rolled = await aio.rollback("acme/as", "serving")
            await aio.set_metadata("acme/as@1", {"description": "d"})
            revisions = [r.number async for r in aio.iter_revisions("acme/as")]
            found = [str(a.adapter) async for a in aio.iter_adapters(alias="serving")]
            return {
                "rolled": rolled.revision,
                "revisions": revisions,
                "found": found,
                "history": len(await aio.alias_history("acme/as", "serving")),
                "stats": (await aio.stats())["revisions"],
                "gc": (await aio.gc(dry_run=True))["dry_run"],
                "verify": (await aio.verify())["problems"],
                # after the prefetch: the NVMe tier then holds revision 1
                "prefetch": [p.state async for p in aio.prefetch(["acme/as@1"])],
                "cache": await aio.list_cache(),
                "description": (await aio.resolve("acme/as@1")).metadata["description"],
            }

    got = asyncio.run(run())
    assert got == {
        "rolled": 1,
        "revisions": [1, 2],
        "found": ["acme/as"],
        "history": 3,
        "stats": client.stats()["revisions"],
        "gc": True,
        "verify": [],
        "cache": client.list_cache(),
        "prefetch": ["done"],
        "description": "d",
    }


def test_server_refuses_a_base_the_pack_was_not_built_for(client, packs):
    # the server checks too (a client that skips the CLI's check cannot relabel an adapter)
    with pytest.raises(InvalidArgument, match="was built for"):
        client.push("acme/rebased", packs["qv-r4"], base_id="another-base")
    with pytest.raises(NotFound):
        client.resolve("acme/rebased")
    assert client.push("acme/rebased", packs["qv-r4"], base_id="tiny-llama-test").created
