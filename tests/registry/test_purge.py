"""Purge of deleted names, over real gRPC with real PEFT adapters and a real LMDB index: the
SDK (sync and asyncio), the CLI's exit statuses, reindex and checkpoint equality, restarts, a
crash between the log write and the index update, gc of the packs, and the audit line."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from typing import Any

import pytest

from catalog.client import AsyncCatalogClient, CatalogClient
from catalog.errors import FailedPrecondition, InvalidName, NotFound
from catalog.events import Event, log_key
from catalog.model import AdapterName
from catalog.service.auth import Guard
from catalog.service.server import create_server, open_catalog
from tests.registry.test_registry_cli import js, one_line_error, run
from tests.servers import running_catalog

NAME = "acme/p"


def everything(client: CatalogClient) -> dict[str, Any]:
    """What a user can read of the catalog: listings, revisions and alias histories."""
    adapters = [s.to_json() for s in client.iter_adapters()]
    return {
        "adapters": adapters,
        "revisions": {
            a["name"]: [r.to_json() for r in client.iter_revisions(a["name"])] for a in adapters
        },
        "history": {
            a["name"]: [m.to_json() for m in client.alias_history(a["name"])] for a in adapters
        },
    }


def delete_everything(client: CatalogClient, name: str = NAME) -> None:
    client.delete(name, all_revisions=True, force=True)


def test_purge_forgets_a_deleted_name_and_frees_it(client, packs):
    one = client.push(NAME, packs["qv-r4"], aliases=["serving"]).revision
    two = client.push(NAME, packs["all-r8"]).revision
    client.set_alias(NAME, "serving", 2)
    client.push("acme/keep", packs["down-r2"], aliases=["serving"])
    with pytest.raises(FailedPrecondition, match=r"cannot purge acme/p: revisions 1, 2 still live"):
        client.purge(NAME)
    client.delete(f"{NAME}@1")
    with pytest.raises(FailedPrecondition, match=r"revision 2 still live; delete them first"):
        client.purge(NAME)
    delete_everything(client)
    # deleted, not yet purged: the name is still listed and its alias history readable
    assert NAME in [str(s.adapter) for s in client.iter_adapters()]
    assert len(client.alias_history(NAME)) == 3

    assert client.purge(NAME) == 2
    assert [str(s.adapter) for s in client.iter_adapters()] == ["acme/keep"]
    for read in (
        lambda: client.alias_history(NAME),
        lambda: client.resolve(f"{NAME}@1"),
        lambda: client.list_revisions(NAME),
    ):
        with pytest.raises(NotFound, match="adapter acme/p not found"):
            read()
    with pytest.raises(NotFound, match="adapter acme/p not found"):
        client.purge(NAME)  # purged already
    with pytest.raises(NotFound):
        client.purge("acme/never")
    with pytest.raises(InvalidName):
        client.purge("acme/Bad Name")
    assert client.alias_history("acme/keep")[0].alias == "serving"

    # the name is free: a push starts a new adapter at revision 1, with no aliases or history
    again = client.push(NAME, packs["down-r2"])
    assert again.created and again.revision.number == 1
    assert again.revision.created_at > two.created_at
    assert client.alias_history(NAME) == []
    assert client.resolve(NAME).aliases == ("latest",)

    # the purged revisions' packs are unreferenced: gc frees them (down-r2 is in use)
    freed = client.gc()
    assert sorted(freed["deleted"]) == sorted([str(one.digest), str(two.digest)])


def test_reindex_and_checkpoint_give_the_same_catalog(client, packs, served):
    for name in (NAME, "acme/gone", "acme/keep"):
        client.push(name, packs["qv-r4"], aliases=["serving"])
        client.push(name, packs["all-r8"])
    for name in (NAME, "acme/gone"):
        delete_everything(client, name)
        client.purge(name)
    client.push(NAME, packs["down-r2"], aliases=["canary"])  # back after the purge
    client.set_metadata(NAME, {"description": "second life"})
    before = everything(client)
    assert [a["name"] for a in before["adapters"]] == ["acme/keep", NAME]

    assert client.reindex()["adapters"] == 2
    assert everything(client) == before
    client.checkpoint()
    client.push("acme/tail", packs["qv-r4"])  # an event after the checkpoint: the log's tail
    delete_everything(client, "acme/tail")
    client.purge("acme/tail")
    assert client.reindex()["adapters"] == 2
    assert everything(client) == before
    # the rebuilt index numbers a purged name's next event past its purge, as the old one did
    pushed = client.push("acme/gone", packs["qv-r4"])
    assert pushed.revision.number == 1
    gone = AdapterName.parse("acme/gone")
    # events 1-6: two pushes, the alias set and removed (rm --force), two deletes; 7: the
    # purge; 8: this push
    assert served.catalog.index.next_seq(gone) == 9


def test_an_all_purged_catalog_restarts_without_a_rebuild(tmp_path, packs, caplog):
    root = tmp_path / "root"
    with running_catalog(root) as served, served.client() as client:
        client.push(NAME, packs["qv-r4"])
        delete_everything(client)
        client.purge(NAME)
        assert served.catalog.index_is_empty() is False  # it holds the name's next seq
    caplog.set_level(logging.WARNING, logger="catalog")
    with running_catalog(root) as served, served.client() as client:
        assert not [r for r in caplog.records if "rebuilding the index" in r.getMessage()]
        assert list(client.iter_adapters()) == []
        assert client.push(NAME, packs["all-r8"]).revision.number == 1

    # with the index gone, the start rebuilds it from the log and the name comes back as pushed
    shutil.rmtree(root / "index")
    with running_catalog(root) as served, served.client() as client:
        assert [(str(s.adapter), s.latest) for s in client.iter_adapters()] == [(NAME, 1)]
        assert client.alias_history(NAME) == []


def test_a_crash_between_the_log_write_and_the_index_update(tmp_path, packs):
    root = tmp_path / "root"
    adapter = AdapterName.parse(NAME)
    with running_catalog(root) as served, served.client() as client:
        client.push(NAME, packs["qv-r4"])
        delete_everything(client)
    catalog = open_catalog(root)
    try:
        seq = catalog.index.next_seq(adapter)
        applying = catalog.index.apply

        def die_on_purge(event: Event) -> None:
            if event.op == "purge":  # after the durable write, before the index update
                raise RuntimeError("the process died here")
            applying(event)

        catalog.index.apply = die_on_purge  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="died here"):
            catalog.purge(adapter)
        del catalog.index.apply
        # the durable log holds the purge; the index holds its intent, not its effect
        stored = catalog.store.get(log_key(adapter, seq))
        assert stored is not None and Event.decode(stored).op == "purge"
        assert [e.op for e in catalog.index.intents()] == ["purge"]
        assert catalog.index.adapter_state(adapter) is not None
    finally:
        catalog.close()

    with running_catalog(root) as served, served.client() as client:
        assert list(client.iter_adapters()) == []  # recovered at start
        assert served.catalog.index.intents() == []
        assert client.push(NAME, packs["all-r8"]).revision.number == 1
        assert served.catalog.index.next_seq(adapter) == seq + 2


def test_the_async_client_purges_too(client, served, packs):
    client.push(NAME, packs["qv-r4"])

    async def run_async() -> tuple[str, int]:
        async with AsyncCatalogClient(served.address) as aio:
            try:
                await aio.purge(NAME)
            except FailedPrecondition as exc:
                refused = str(exc)
            await aio.delete(NAME, all_revisions=True)
            return refused, await aio.purge(NAME)

    refused, revisions = asyncio.run(run_async())
    assert "revision 1 still live" in refused and revisions == 1
    assert list(client.iter_adapters()) == []


def test_purge_is_audited_and_the_event_names_its_principal(tmp_path, packs, caplog):
    audit = logging.getLogger("tests.purge.audit")
    catalog = open_catalog(tmp_path / "root")
    server, port = create_server(catalog, "127.0.0.1:0", guard=Guard(None, audit))
    caplog.set_level(logging.INFO, logger="tests.purge.audit")
    try:
        with CatalogClient(f"127.0.0.1:{port}") as client:
            client.push(NAME, packs["qv-r4"])
            with pytest.raises(FailedPrecondition):
                client.purge(NAME)
            delete_everything(client)
            client.purge(NAME)
    finally:
        server.stop(grace=None).wait()
        catalog.close()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == audit.name]
    purges = [(line["target"], line["outcome"]) for line in lines if line["method"] == "Purge"]
    assert purges == [(NAME, "FAILED_PRECONDITION"), (NAME, "OK")]


def test_cli_purge_and_its_exit_statuses(served, adapter_dirs):
    a = served.address
    run(a, "push", adapter_dirs["qv-r4"], NAME, "--base", "b", "--alias", "serving")
    run(a, "push", adapter_dirs["all-r8"], NAME, "--base", "b")
    one_line_error(run(a, "purge", NAME, check=False), 5, "revisions 1, 2 still live")
    one_line_error(run(a, "purge", "acme/nope", check=False), 3, "not found")
    one_line_error(run(a, "purge", f"{NAME}@1", check=False), 2, "not a revision")
    one_line_error(run(a, "purge", "no-slash", check=False), 2, "no-slash")
    run(a, "rm", NAME, "--all", "--force")
    assert [x["name"] for x in js(a, "ls")["adapters"]] == [NAME]  # deleted, still listed
    assert js(a, "purge", NAME) == {"name": NAME, "purged": True, "revisions": 2}
    assert js(a, "ls")["adapters"] == []
    one_line_error(run(a, "purge", NAME, check=False), 3, "not found")
    run(a, "push", adapter_dirs["down-r2"], NAME, "--base", "b")
    assert js(a, "show", NAME)["revision"] == 1
    run(a, "rm", NAME, "--all")
    assert run(a, "purge", NAME).stdout.strip() == (
        f"purged {NAME} (1 deleted revision(s) forgotten)"
    )


def test_a_purge_racing_a_push_of_the_same_name(client, packs):
    """Whichever takes the adapter's lock first wins; the other sees its effect, never half."""
    client.push(NAME, packs["qv-r4"])
    for round_ in range(6):
        delete_everything(client)
        results: dict[str, Any] = {}
        pack = packs["all-r8" if round_ % 2 else "down-r2"]

        def purge(results: dict[str, Any] = results) -> None:
            try:
                results["purge"] = client.purge(NAME)
            except FailedPrecondition as exc:
                results["purge"] = exc

        def push(results: dict[str, Any] = results, pack: bytes = pack) -> None:
            results["push"] = client.push(NAME, pack).revision.number

        threads = [threading.Thread(target=purge), threading.Thread(target=push)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if isinstance(results["purge"], FailedPrecondition):  # the push came first
            assert results["push"] > 1
            assert "still live" in str(results["purge"])
        else:  # the purge came first: the push started a new adapter
            assert results["push"] == 1
            assert client.alias_history(NAME) == []
        assert client.resolve(NAME).number == results["push"]
    before = everything(client)
    client.reindex()
    assert everything(client) == before


def test_purge_on_s3_and_a_second_machine_sees_the_same(tmp_path, s3_store_url, packs):
    with running_catalog(tmp_path / "a", s3_store_url) as served, served.client() as client:
        for name in (NAME, "acme/gone"):
            client.push(name, packs["qv-r4"], aliases=["serving"])
            delete_everything(client, name)
            client.purge(name)
        client.push(NAME, packs["all-r8"])
        before = everything(client)
        assert client.verify()["problems"] == []

    # a different machine: nothing local, only the bucket (the start rebuilds the index)
    with running_catalog(tmp_path / "b", s3_store_url) as served, served.client() as client:
        assert everything(client) == before
        assert client.push("acme/gone", packs["down-r2"]).revision.number == 1
        assert len(client.gc()["deleted"]) == 1  # qv-r4's pack: both names that held it purged
