"""Every RPC x {no token, wrong token, read, write, engine, admin} x {own tenant, other tenant,
missing adapter in each}, through the SDK, asserting the exact status code.

The principals reach tenants ``acme`` and ``acme-*``; ``victim/other`` exists, ``victim/nope``
does not, and both must answer PERMISSION_DENIED alike (no existence leak). A call that is
allowed gets its ordinary answer: OK, or NOT_FOUND for the missing adapter of its own tenant.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.client import AsyncCatalogClient, CatalogClient
from catalog.client.errors import translated
from catalog.errors import CatalogError, PermissionDenied, Unauthenticated
from catalog.service.auth import METHOD_RULES, ROLE_CAPABILITIES
from catalog.service.handlers import SERVICE
from tests.security.conftest import ROOT_TOKEN, TOKENS, AuthCatalog

OWN, OTHER, MISSING_OWN, MISSING_OTHER = "acme/own", "victim/other", "acme/nope", "victim/nope"
TARGETS = (OWN, OTHER, MISSING_OWN, MISSING_OTHER)
CALLERS = ("none", "wrong", "read", "write", "engine", "admin")


#: The engine id of the caller under test: an engine id belongs to the principal that
#: registered it (another principal's is refused).
_ENGINE: list[str] = ["eng-1"]


def _hints(client: CatalogClient, name: str) -> None:
    # a registered engine's stream stays open: an allowed call ends at its short deadline
    call = client._stub.WatchHints(pb.WatchHintsRequest(engine_id=_ENGINE[0]), timeout=0.3)
    with translated(client.target):
        for _ in call:
            break


def _engine_register(client: CatalogClient, name: str) -> None:
    client.register_engine(_ENGINE[0], "tiny-llama-test", 4, 8)


def _raw(method: str, request: Any) -> Callable[[CatalogClient, str], Any]:
    def call(client: CatalogClient, name: str) -> Any:
        with translated(client.target):
            return getattr(client._stub, method)(request, timeout=5)

    return call


def _streamed(method: str, request: Any) -> Callable[[CatalogClient, str], Any]:
    def call(client: CatalogClient, name: str) -> Any:
        with translated(client.target):
            return list(getattr(client._stub, method)(request, timeout=5))

    return call


#: RPC -> (call(client, adapter name), tenant-scoped). Each call uses ``name`` as its target.
CALLS: dict[str, tuple[Callable[[CatalogClient, str], Any], bool]] = {
    "Push": (lambda c, n: c.push(f"{n}-pushed", _PACK[0]), True),  # keeps "nope" missing
    "GetPushInbox": (_raw("GetPushInbox", pb.PushInboxRequest()), False),
    "PushFromInbox": (
        lambda c, n: _raw(
            "PushFromInbox",
            pb.PushFromInboxRequest(
                header=pb.PushHeader(name=f"{n}-pushed", size_bytes=100),
                file_name="push-no-such-file.pack",
            ),
        )(c, n),
        True,
    ),
    "Resolve": (lambda c, n: c.resolve(f"{n}@serving"), True),
    "ListAdapters": (lambda c, n: c.list_adapters(n), True),
    "ListRevisions": (lambda c, n: c.list_revisions(n), True),
    "SetAlias": (lambda c, n: c.set_alias(n, "serving", 1), True),
    "Rollback": (lambda c, n: c.rollback(n, "never-set"), True),
    "AliasHistory": (lambda c, n: c.alias_history(n), True),
    "SetMetadata": (lambda c, n: c.set_metadata(f"{n}@serving", {"k": "v"}), True),
    "Delete": (lambda c, n: c.delete(f"{n}@99"), True),
    "Purge": (lambda c, n: c.purge(n), True),
    "FetchPack": (lambda c, n: c.fetch(f"{n}@serving"), True),
    "Prefetch": (lambda c, n: list(c.prefetch([f"{n}@serving"])), True),
    "PinPack": (lambda c, n: c.pin_pack(f"{n}@serving"), True),
    "UnpinPack": (lambda c, n: c.unpin_pack(f"{n}@serving"), True),
    "EvictPack": (lambda c, n: c.evict_pack(f"{n}@99"), True),
    "Stats": (lambda c, n: c.stats(), False),
    "GarbageCollect": (lambda c, n: c.gc(dry_run=True), False),
    "Verify": (lambda c, n: c.verify(), False),
    "Reindex": (lambda c, n: c.reindex(), False),
    "Checkpoint": (lambda c, n: c.checkpoint(), False),
    "ListCache": (lambda c, n: c.list_cache(), False),
    "GetPackCacheLocation": (_raw("GetPackCacheLocation", pb.PackCacheLocationRequest()), False),
    "LeasePack": (
        lambda c, n: _raw("LeasePack", pb.LeasePackRequest(ref=f"{n}@serving"))(c, n),
        True,
    ),
    "ReleasePackLease": (_raw("ReleasePackLease", pb.ReleasePackLeaseRequest(lease_id="x")), False),
    "ReportPackReads": (
        lambda c, n: _raw("ReportPackReads", pb.ReportPackReadsRequest(refs=[f"{n}@serving"]))(
            c, n
        ),
        True,
    ),
    "RegisterEngine": (_engine_register, False),
    "ReportResidency": (lambda c, n: c.report_residency(_ENGINE[0], [], []), False),
    "WatchHints": (_hints, False),
    "ExportRequests": (_streamed("ExportRequests", pb.ExportRequestsRequest()), False),
    "ExportPeftDir": (
        lambda c, n: c.export_peft_dir(f"{n}@serving", "/nowhere", nonce="n" * 32),
        True,
    ),
}
_PACK: list[bytes] = []

#: What an allowed call on the own tenant answers when it is not OK (an ordinary refusal,
#: decided after authorization).
ALLOWED_OWN = {
    "Rollback": "NOT_FOUND",  # the alias was never set
    "Delete": "NOT_FOUND",  # revision 99 does not exist
    "Purge": "FAILED_PRECONDITION",  # its revisions are live
    "EvictPack": "NOT_FOUND",
    "WatchHints": "DEADLINE_EXCEEDED",
    "ExportPeftDir": "FAILED_PRECONDITION",  # this catalog has no --peft-export-root
    "PushFromInbox": "NOT_FOUND",  # no such file in the inbox
}
#: On a missing adapter of the own tenant. ListAdapters and Prefetch answer OK (an empty page,
#: a "failed" progress line); Push creates it; ReportPackReads skips a read it cannot count.
ALLOWED_MISSING = {"ListAdapters": "OK", "Prefetch": "OK", "Push": "OK", "ReportPackReads": "OK"}


def test_every_rpc_is_in_the_matrix_and_the_rule_table() -> None:
    methods = {m.name for m in SERVICE.methods}
    assert methods == set(CALLS) == set(METHOD_RULES)


def _status(call: Callable[[CatalogClient, str], Any], client: CatalogClient, name: str) -> str:
    try:
        call(client, name)
    except CatalogError as exc:
        return exc.grpc_code
    return "OK"


def _expected(caller: str, method: str, target: str) -> str:
    if caller in ("none", "wrong"):
        return "UNAUTHENTICATED"
    rule = METHOD_RULES[method]
    if rule.capability not in ROLE_CAPABILITIES[caller]:
        return "PERMISSION_DENIED"
    scoped = CALLS[method][1]
    if scoped and target.startswith("victim/"):
        return "PERMISSION_DENIED"
    if scoped and target == MISSING_OWN:
        return ALLOWED_MISSING.get(method, "NOT_FOUND")
    return ALLOWED_OWN.get(method, "OK")


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("caller", CALLERS)
def test_status_for_every_caller_and_target(
    auth_catalog: AuthCatalog, packs: dict[str, bytes], caller: str, method: str
) -> None:
    _PACK[:] = [packs["qv-r4"]]
    _ENGINE[:] = [f"eng-{caller}"]
    token = {"none": None, "wrong": "not-a-token"}.get(caller, TOKENS.get(caller))
    call, scoped = CALLS[method]
    with auth_catalog.client(token) as client:
        if method in ("ReportResidency", "WatchHints") and caller in ("engine", "admin"):
            _engine_register(client, OWN)
        got = {t: _status(call, client, t) for t in (TARGETS if scoped else (OWN,))}
    want = {t: _expected(caller, method, t) for t in got}
    assert got == want


def test_missing_and_existing_adapters_of_another_tenant_answer_alike(
    auth_catalog: AuthCatalog,
) -> None:
    with auth_catalog.client(TOKENS["admin"]) as client:
        answers = set()
        for ref in ("victim/other@serving", "victim/nope@serving", "victim/other@7"):
            with pytest.raises(CatalogError) as refused:
                client.resolve(ref)
            answers.add((refused.value.grpc_code, str(refused.value)))
    assert answers == {
        ("PERMISSION_DENIED", "principal 'admin-user' may not act on tenant 'victim'")
    }


def test_listings_show_only_reachable_tenants(auth_catalog: AuthCatalog) -> None:
    with auth_catalog.client(TOKENS["read"]) as reader:
        seen = {a.adapter.tenant for a in reader.iter_adapters(page_size=1)}
        assert seen == {"acme"}
        assert {a.adapter.tenant for a in reader.list_adapters().items} == {"acme"}
    with auth_catalog.client(ROOT_TOKEN) as root:
        assert {a.adapter.tenant for a in root.iter_adapters()} == {"acme", "victim"}


def test_stats_hide_the_store_location_from_non_admins(auth_catalog: AuthCatalog) -> None:
    with auth_catalog.client(TOKENS["read"]) as reader:
        assert reader.stats()["store_url"] == "file://"
    with auth_catalog.client(TOKENS["admin"]) as admin:
        assert admin.stats()["store_url"].startswith("file:///")
        assert str(auth_catalog.root) in admin.stats()["store_url"]


def test_malformed_authorization_header_is_unauthenticated(auth_catalog: AuthCatalog) -> None:
    channel = grpc.insecure_channel(auth_catalog.address)
    try:
        resolve = channel.unary_unary(
            "/loracat.v1.Catalog/Resolve",
            request_serializer=pb.ResolveRequest.SerializeToString,
            response_deserializer=pb.Revision.FromString,
        )
        for header in ("Basic dXNlcjpwdw==", "Bearer", TOKENS["read"]):
            with pytest.raises(grpc.RpcError) as refused:
                resolve(
                    pb.ResolveRequest(ref="acme/own"),
                    metadata=(("authorization", header),),
                    timeout=5,
                )
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()


def test_every_event_names_its_principal_and_history_shows_who(
    auth_catalog: AuthCatalog, packs: dict[str, bytes]
) -> None:
    with auth_catalog.client(TOKENS["write"]) as writer:
        pushed = writer.push("acme-audit/model", packs["down-r2"]).revision
        writer.set_alias("acme-audit/model", "canary", pushed.number)
        writer.set_metadata(f"acme-audit/model@{pushed.number}", {"note": "x"})
        assert pushed.metadata["provenance.principal"] == "write-user"
        moves = writer.alias_history("acme-audit/model", "canary")
        assert [(m.revision, m.principal) for m in moves] == [(pushed.number, "write-user")]
    store_root = auth_catalog.root / "catalog" / "store" / "log" / "acme-audit" / "model"
    events = [json.loads(p.read_text()) for p in sorted(store_root.glob("*.json"))]
    assert [(e["op"], e["principal"]) for e in events] == [
        ("push", "write-user"),
        ("alias", "write-user"),
        ("metadata", "write-user"),
    ]
    with auth_catalog.client(ROOT_TOKEN) as root:
        root.reindex()  # the index is rebuilt from the log: who moved it survives
        assert root.alias_history("acme-audit/model", "canary")[0].principal == "write-user"
        assert root.resolve("acme-audit/model").metadata["provenance.principal"] == "write-user"


def test_the_async_client_sends_its_token_on_every_kind_of_call(
    auth_catalog: AuthCatalog, packs: dict[str, bytes]
) -> None:
    async def main() -> None:
        async with AsyncCatalogClient(auth_catalog.address, token=TOKENS["write"]) as client:
            pushed = await client.push("acme/aio", packs["qv-r4"])  # a client stream
            assert await client.fetch("acme/aio") == packs["qv-r4"]  # a server stream
            assert (await client.resolve("acme/aio")).digest == pushed.revision.digest
            with pytest.raises(PermissionDenied):
                await client.resolve("victim/other")
        async with AsyncCatalogClient(auth_catalog.address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.fetch("acme/aio")

    asyncio.run(main())


def test_a_prefetch_reports_a_bad_reference_on_its_line_with_auth_as_without(
    auth_catalog: AuthCatalog,
) -> None:
    # the SDK refuses a bad reference itself: this is what another client may send
    def prefetch(client: CatalogClient, refs: list[str]) -> dict[str, str]:
        with translated(client.target):
            call = client._stub.Prefetch(pb.PrefetchRequest(refs=refs), timeout=30)
            return {p.ref: p.state for p in call}

    with auth_catalog.client(TOKENS["engine"]) as engine:
        progress = prefetch(engine, ["acme/own@serving", "not a ref"])
        assert progress == {"acme/own@serving": "done", "not a ref": "failed"}
        with pytest.raises(PermissionDenied):
            prefetch(engine, ["not a ref", "victim/other@serving"])
