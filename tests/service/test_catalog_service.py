"""The catalog end to end through real gRPC on port 0: push, resolve, aliases, fetch, admin."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.digest import Digest
from catalog.errors import (
    Conflict,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    InvalidName,
    InvalidPack,
    InvalidReference,
    NotFound,
)
from catalog.events import blob_key
from catalog.pack import export_peft_dir, read_pack
from tests.service.conftest import BASE_ID


def store_keys(served) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(served.catalog.store.list(""))


def test_push_resolve_fetch_roundtrip_is_bit_exact(client, packs, adapter_dirs, tmp_path):
    result = client.push("acme/support", packs["qv-r4"])
    rev = result.revision
    assert result.created
    assert (str(rev.adapter), rev.number) == ("acme/support", 1)
    assert rev.digest == Digest.of(packs["qv-r4"])
    assert rev.base_id == BASE_ID and rev.rank == 4 and rev.size_bytes == len(packs["qv-r4"])
    assert "latest" in rev.aliases

    fetched = client.fetch("acme/support")
    assert fetched == packs["qv-r4"]
    export_peft_dir(fetched, tmp_path / "out")
    original = load_file(str(adapter_dirs["qv-r4"] / "adapter_model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert original.keys() == exported.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype
        assert exported[key].shape == tensor.shape
        assert exported[key].view(-1).view_as(tensor).equal(tensor), key


def test_revisions_number_up_and_refs_resolve(client, packs):
    digests = []
    for n, key in enumerate(["qv-r4", "all-r8", "down-r2"], start=1):
        rev = client.push("acme/bot", packs[key]).revision
        assert rev.number == n
        digests.append(rev.digest)
    assert client.resolve("acme/bot").number == 3
    assert client.resolve("acme/bot@2").digest == digests[1]
    assert client.resolve(f"acme/bot@{digests[0]}").number == 1
    assert client.resolve(f"acme/bot@{digests[0].short}").number == 1
    assert client.fetch("acme/bot@2") == packs["all-r8"]


def test_identical_push_returns_existing_revision(client, packs):
    first = client.push("acme/same", packs["qv-r4"])
    again = client.push("acme/same", packs["qv-r4"])
    assert first.created and not again.created
    assert again.revision.number == first.revision.number == 1


def test_alias_compare_and_swap_and_rollback(client, packs):
    for key in ("qv-r4", "all-r8", "down-r2"):
        client.push("acme/pol", packs[key])
    move = client.set_alias("acme/pol", "serving", 1, expected=0)
    assert (move.previous, move.revision) == (0, 1)
    client.set_alias("acme/pol", "serving", 2, expected=1)
    with pytest.raises(Conflict, match="points at revision 2, expected 1"):
        client.set_alias("acme/pol", "serving", 3, expected=1)
    assert client.resolve("acme/pol@serving").number == 2

    back = client.rollback("acme/pol", "serving")
    assert (back.previous, back.revision) == (2, 1)
    assert client.resolve("acme/pol@serving").number == 1
    history = client.alias_history("acme/pol", "serving")
    assert [(m.previous, m.revision) for m in history] == [(0, 1), (1, 2), (2, 1)]


def test_push_with_alias_and_metadata(client, packs):
    rev = client.push(
        "acme/ev", packs["qv-r4"], aliases=["canary"], metadata={"trainer": "t1"}
    ).revision
    assert "canary" in client.resolve("acme/ev@canary").aliases
    recorded = {"provenance.principal": "anonymous", "provenance.host": socket.gethostname()}
    assert rev.metadata == {"trainer": "t1", **recorded}
    updated = client.set_metadata("acme/ev@1", {"eval.accuracy": "0.91"})
    assert updated.metadata == {"trainer": "t1", "eval.accuracy": "0.91", **recorded}


def test_listing_pages_and_prefixes(client, packs):
    for tenant in ("acme", "acme2"):
        for i in range(5):
            client.push(f"{tenant}/a{i}", packs["down-r2"])
    page = client.list_adapters("acme", page_size=2)
    assert [str(s.adapter) for s in page.items] == ["acme/a0", "acme/a1"]
    assert page.next_token
    names = [str(s.adapter) for s in client.iter_adapters("acme", page_size=2)]
    assert names == [f"acme/a{i}" for i in range(5)]
    assert len(list(client.iter_adapters(""))) == 10
    with pytest.raises(InvalidArgument):
        client.list_adapters("acme", page_token="not-a-token!")


def test_delete_rules_and_gc(client, served, packs):
    client.push("acme/del", packs["qv-r4"])
    client.push("acme/del", packs["all-r8"])
    client.set_alias("acme/del", "serving", 1)
    with pytest.raises(FailedPrecondition, match="aliased as serving"):
        client.delete("acme/del@1")
    assert client.delete("acme/del@2") == [2]
    assert client.resolve("acme/del").number == 1  # latest falls back
    with pytest.raises(NotFound):
        client.resolve("acme/del@2")
    result = client.gc()
    assert result["deleted"] == [str(Digest.of(packs["all-r8"]))]
    assert served.catalog.store.get(blob_key(Digest.of(packs["qv-r4"]))) is not None
    # the whole adapter too: serving still points at 1, so only a forced delete goes ahead
    with pytest.raises(FailedPrecondition, match="serving->1"):
        client.delete("acme/del", all_revisions=True)
    assert client.resolve("acme/del@serving").number == 1
    assert client.delete("acme/del", all_revisions=True, force=True) == [1]
    with pytest.raises(NotFound):
        client.resolve("acme/del")


def test_shared_blob_survives_gc_while_referenced(client, packs):
    client.push("acme/x", packs["qv-r4"])
    client.push("other/y", packs["qv-r4"])
    client.delete("acme/x", all_revisions=True)
    assert client.gc()["deleted"] == []
    assert client.fetch("other/y") == packs["qv-r4"]


def test_corrupt_blob_is_data_loss_and_verify_reports_it(client, served, packs):
    rev = client.push("acme/c", packs["qv-r4"]).revision
    assert client.verify()["problems"] == []
    path = Path(served.root / "store" / blob_key(rev.digest))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match="acme/c@1 is corrupt"):
        client.fetch("acme/c")
    problems = client.verify()["problems"]
    assert len(problems) == 1 and str(rev.digest) in problems[0]


def test_ranged_fetch(client, packs):
    client.push("acme/r", packs["all-r8"])
    assert client.fetch("acme/r", offset=100, length=5000) == packs["all-r8"][100:5100]
    tail = len(packs["all-r8"]) - 10
    assert client.fetch("acme/r", offset=tail) == packs["all-r8"][tail:]


def test_reindex_reproduces_listing(client, packs):
    for key in ("qv-r4", "all-r8"):
        client.push("acme/ri", packs[key])
    client.push("beta/ri", packs["down-r2"], aliases=["serving"])
    client.set_alias("acme/ri", "serving", 1)
    client.delete("acme/ri@2")
    before = [s.to_json() for s in client.iter_adapters()]
    revs_before = [r.to_json() for r in client.iter_revisions("acme/ri")]
    result = client.reindex()
    assert (result["adapters"], result["revisions"]) == (2, 2)
    assert [s.to_json() for s in client.iter_adapters()] == before
    assert [r.to_json() for r in client.iter_revisions("acme/ri")] == revs_before


# -- bad input: exact errors, nothing written -----------------------------------------------


def test_unknown_references_are_not_found(client, packs):
    with pytest.raises(NotFound, match="acme/nope"):
        client.resolve("acme/nope")
    client.push("acme/k", packs["qv-r4"])
    with pytest.raises(NotFound):
        client.resolve("acme/k@9")
    with pytest.raises(NotFound):
        client.resolve("acme/k@serving")
    with pytest.raises(NotFound):
        client.resolve("acme/k@sha256:" + "0" * 64)


def test_bad_names_are_refused_locally_and_by_the_server(client, served, packs):
    with pytest.raises(InvalidName):
        client.push("Acme/Bad", packs["qv-r4"])
    with pytest.raises(InvalidReference):
        client.resolve("acme/bad@sha256:abc")
    # The server refuses too, for callers that bypass the SDK's local checks.
    channel = grpc.insecure_channel(served.address)
    stub = pb_grpc.CatalogStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Resolve(pb.ResolveRequest(ref="UPPER/case"), timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(
            iter([pb.PushRequest(header=pb.PushHeader(name="../etc", size_bytes=10))]), timeout=5
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    assert store_keys(served) == []


def raw_push(served, messages):  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(
        served.address, options=[("grpc.max_send_message_length", 64 << 20)]
    )
    try:
        return pb_grpc.CatalogStub(channel).Push(iter(messages), timeout=10)
    finally:
        channel.close()


def test_oversized_chunk_is_refused(served):
    header = pb.PushHeader(name="acme/big", size_bytes=6 << 20)
    with pytest.raises(grpc.RpcError) as info:
        raw_push(served, [pb.PushRequest(header=header), pb.PushRequest(chunk=b"\0" * (5 << 20))])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk limit" in info.value.details()
    header = pb.PushHeader(name="acme/big", size_bytes=20 << 20)
    with pytest.raises(grpc.RpcError) as info:
        raw_push(served, [pb.PushRequest(header=header), pb.PushRequest(chunk=b"\0" * (10 << 20))])
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert store_keys(served) == []
    assert list(served.catalog.spool_dir.iterdir()) == []


def test_push_protocol_violations(served, packs):
    data = packs["qv-r4"]
    cases = [
        ([pb.PushRequest(chunk=data)], "must start with a header"),
        (
            [
                pb.PushRequest(header=pb.PushHeader(name="acme/t", size_bytes=len(data) + 1)),
                pb.PushRequest(chunk=data),
            ],
            # refused once the pack's header arrived, before the rest is waited for
            f"header describes {len(data)} bytes, but {len(data) + 1} were declared",
        ),
        (
            [
                pb.PushRequest(header=pb.PushHeader(name="acme/t", size_bytes=len(data) - 1)),
                pb.PushRequest(chunk=data),
            ],
            "more bytes than",
        ),
    ]
    for messages, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            raw_push(served, messages)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in info.value.details()
    header = pb.PushHeader(
        name="acme/t", size_bytes=len(data), expected_digest="sha256:" + "1" * 64
    )
    with pytest.raises(grpc.RpcError) as info:
        raw_push(served, [pb.PushRequest(header=header), pb.PushRequest(chunk=data)])
    assert info.value.code() is grpc.StatusCode.DATA_LOSS
    assert store_keys(served) == []


def test_hostile_pack_is_refused_and_nothing_is_written(client, served, packs):
    data = bytearray(packs["qv-r4"])
    data[0:8] = (1 << 60).to_bytes(8, "little")  # a header length far beyond the file
    with pytest.raises(InvalidPack):
        client.push("acme/evil", bytes(data))
    with pytest.raises(InvalidPack):
        client.push("acme/evil", b"not a pack at all")
    assert store_keys(served) == []
    assert served.catalog.index.counts()["adapters"] == 0


def test_pack_whose_shapes_contradict_its_manifest(client, served, packs):
    import json
    import struct

    data = packs["qv-r4"]
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    manifest = json.loads(header["__metadata__"]["loracat.manifest"])
    manifest["modules"][0]["rank"] = 3  # tensors say 4
    header["__metadata__"]["loracat.manifest"] = json.dumps(manifest)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    forged = struct.pack("<Q", len(encoded)) + encoded + data[8 + header_len :]
    with pytest.raises(InvalidPack):
        client.push("acme/forged", forged)
    assert store_keys(served) == []


def test_pushed_pack_is_a_valid_pack(packs):
    pack = read_pack(packs["all-r8"])
    assert pack.manifest.rank == 8
    assert len(pack.manifest.modules) == 7


def test_checkpoint_then_reindex_reproduces_listing(client, packs):
    client.push("acme/cp", packs["qv-r4"], aliases=["serving"])
    client.push("acme/cp", packs["all-r8"])
    first = client.checkpoint()
    assert first["written"] and first["events"] == 3
    client.push("beta/cp", packs["down-r2"])  # the tail after the checkpoint
    before = [s.to_json() for s in client.iter_adapters()]
    assert client.reindex()["events"] == 4
    assert [s.to_json() for s in client.iter_adapters()] == before
    again = client.checkpoint()
    assert again["written"] and again["new_events"] == 1 and again["previous"] == first["name"]
    assert client.checkpoint()["written"] is False
    assert client.verify()["problems"] == []


def test_parallel_ranged_fetch_of_a_large_pack(client, packs, monkeypatch):
    from catalog.client import parallel_fetch
    from catalog.pack import read_pack, write_pack

    pack = read_pack(packs["all-r8"])
    tensors = {name: pack.tensor(name) for name in pack.tensor_names()}
    data = write_pack(pack.manifest.with_base_id("x" * 64), tensors)
    rev = client.push("acme/big", data).revision
    # several ranges even for this small pack
    monkeypatch.setattr(parallel_fetch, "MIN_PARALLEL_RANGE", 4096)
    seen = []
    got_rev, got = client.fetch_with_revision(
        "acme/big", parallel=4, progress=lambda done, total: seen.append((done, total))
    )
    assert got == data and got_rev.digest == rev.digest
    assert len(seen) == 4 and seen[-1] == (len(data), len(data))


def test_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(served.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(
            health_pb2.HealthCheckRequest(service="loracat.v1.Catalog"), timeout=5
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [response] = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = {s.name for s in response.list_services_response.service}
        assert "loracat.v1.Catalog" in names and "grpc.health.v1.Health" in names
    finally:
        channel.close()
