"""Fetching packs: the raw ``PackChunk`` decoder against protobuf's, the receiver's ordering and
integrity checks, and fetches over real gRPC from the catalog and from a misbehaving server
(bad bytes are ``DataLoss``, never returned)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.client import AsyncCatalogClient, CatalogClient, parallel_fetch
from catalog.client.transfer import PackReceiver, decode_chunk
from catalog.convert import revision_to_pb
from catalog.errors import DataLoss
from catalog.model import Revision
from tests.servers import RunningCatalog

# -- the decoder ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@given(
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=300),
    name=st.none() | st.text(max_size=20),
)
def test_decode_chunk_reads_what_protobuf_writes(offset: int, data: bytes, name: str | None):
    message = pb.PackChunk(offset=offset, data=data)
    if name is not None:
        message.revision.name = name
        message.revision.revision = 7
    got_offset, got_data, got_revision = decode_chunk(message.SerializeToString(), "t/n")
    assert (got_offset, bytes(got_data)) == (offset, data)
    if name is None:
        assert got_revision is None
    else:
        assert got_revision is not None
        assert pb.Revision.FromString(bytes(got_revision)) == message.revision


def test_decode_chunk_skips_fields_it_does_not_know():
    known = pb.PackChunk(offset=5, data=b"abc").SerializeToString()
    unknown = (
        _varint(9 << 3 | 0)
        + _varint(300)
        + _varint(10 << 3 | 5)
        + b"\x01\x02\x03\x04"
        + _varint(11 << 3 | 1)
        + b"\x00" * 8
        + _varint(12 << 3 | 2)
        + _varint(3)
        + b"xyz"
    )
    offset, data, revision = decode_chunk(unknown + known + unknown, "t/n")
    assert (offset, bytes(data), revision) == (5, b"abc", None)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x08\xff", "varint"),  # offset's varint never ends
        (b"\x12\x05abc", "truncated"),  # data says 5 bytes, 3 follow
        (b"\x10\x01", "wire type"),  # data (field 2) as a varint
        (b"\x0a\x01x", "wire type"),  # offset (field 1) as bytes
        (b"\x1b", "wire type"),  # a group start
        (_varint(10 << 3 | 5) + b"\x01\x02", "fixed"),  # fixed32 cut short
    ],
)
def test_decode_chunk_refuses_malformed_bytes(raw: bytes, why: str):
    with pytest.raises(DataLoss, match=why):
        decode_chunk(raw, "t/n")


# -- the receiver ---------------------------------------------------------------------------


@pytest.fixture
def pushed(client: CatalogClient, packs: dict[str, bytes]) -> tuple[Revision, bytes]:
    data = packs["all-r8"]
    return client.push("acme/fetch", data).revision, data


def _chunks(revision: Revision, data: bytes, size: int = 1000, start: int = 0) -> list[bytes]:
    out = []
    for at in range(start, max(len(data), start + 1), size):
        message = pb.PackChunk(offset=at, data=data[at : at + size])
        if at == start:
            message.revision.CopyFrom(revision_to_pb(revision))
        out.append(message.SerializeToString())
    return out


def test_the_receiver_assembles_in_order_chunks_and_checks_the_digest(pushed):
    revision, data = pushed
    receiver = PackReceiver("acme/fetch@1", 0, 0)
    for raw in _chunks(revision, data):
        receiver.add(raw)
    got_revision, got = receiver.result()
    assert got_revision == revision and got == data and got.readonly

    ranged = PackReceiver("acme/fetch@1", 100, 2500)
    for raw in _chunks(revision, data[:2600], start=100):
        ranged.add(raw)
    assert ranged.result()[1] == data[100:2600]


def test_the_receiver_refuses_what_a_correct_server_never_sends(pushed):
    revision, data = pushed
    chunks = _chunks(revision, data)

    def feed(raws: list[bytes], *, offset: int = 0, length: int = 0) -> None:
        receiver = PackReceiver("acme/fetch@1", offset, length)
        for raw in raws:
            receiver.add(raw)
        receiver.result()

    with pytest.raises(DataLoss, match="no revision"):
        feed(chunks[1:])
    with pytest.raises(DataLoss, match="expected one at 1000"):
        feed([chunks[0], chunks[2]])
    with pytest.raises(DataLoss, match="a second revision"):
        feed([chunks[0], chunks[0]])
    with pytest.raises(DataLoss, match=f"ended after 3000 of {len(data)}"):
        feed(chunks[:3])
    with pytest.raises(DataLoss, match="within 0\\+10"):
        feed(chunks[:1], length=10)  # 1000 bytes for a 10-byte range
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    with pytest.raises(DataLoss, match="hash to"):
        feed(_chunks(revision, bytes(flipped)))
    receiver = PackReceiver("acme/fetch@1", 0, 0, verify=False)
    for raw in _chunks(revision, bytes(flipped)):
        receiver.add(raw)
    assert receiver.result()[1] == flipped  # verify=False: the caller asked for no check


# -- over gRPC ------------------------------------------------------------------------------


def test_fetch_returns_a_read_only_view_of_the_verified_pack(client: CatalogClient, pushed):
    revision, data = pushed
    got = client.fetch("acme/fetch")
    assert isinstance(got, memoryview) and got.readonly and got == data
    assert client.fetch(revision, offset=10, length=5000) == data[10:5010]
    assert client.fetch(revision, offset=len(data)) == b""
    seen: list[tuple[int, int]] = []
    client.fetch(revision, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(data), len(data))


def test_parallel_ranges_land_in_one_buffer(client: CatalogClient, pushed, monkeypatch):
    revision, data = pushed
    monkeypatch.setattr(parallel_fetch, "MIN_PARALLEL_RANGE", 3000)
    got_revision, got = client.fetch_with_revision(revision, parallel=4)
    assert got_revision == revision and got == data and got.readonly


def test_the_asyncio_client_fetches_the_same_bytes(served: RunningCatalog, pushed):
    revision, data = pushed

    async def fetch() -> tuple[memoryview, memoryview]:
        async with AsyncCatalogClient(served.address) as client:
            return await client.fetch("acme/fetch"), await client.fetch(revision, offset=7)

    whole, tail = asyncio.run(fetch())
    assert whole == data and whole.readonly and tail == data[7:]


@contextmanager
def fake_catalog(stream: Callable[[pb.FetchPackRequest], Iterator[pb.PackChunk]]) -> Iterator[str]:
    """A gRPC server on a free port whose FetchPack streams what ``stream`` yields."""
    handler = grpc.method_handlers_generic_handler(
        "loracat.v1.Catalog",
        {
            "FetchPack": grpc.unary_stream_rpc_method_handler(
                lambda request, context: stream(request),
                request_deserializer=pb.FetchPackRequest.FromString,
                response_serializer=pb.PackChunk.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()


def test_bytes_that_do_not_match_the_digest_are_data_loss(pushed):
    revision, data = pushed
    flipped = bytearray(data)
    flipped[-1] ^= 0x80

    def stream(request: pb.FetchPackRequest) -> Iterator[pb.PackChunk]:
        for raw in _chunks(revision, bytes(flipped), size=4096):
            yield pb.PackChunk.FromString(raw)

    with fake_catalog(stream) as address, CatalogClient(address) as client:
        with pytest.raises(DataLoss, match="hash to"):
            client.fetch(revision)
        with pytest.raises(DataLoss, match="hash to"):
            client.fetch_with_revision(revision, parallel=2)  # one range (small pack)
        assert client.fetch(revision, verify=False) == flipped


def test_both_clients_check_parallel_ranges_as_one_pack(pushed, monkeypatch):
    """Four ranges, each named by its digest; a flipped last byte is ``DataLoss`` from the
    whole pack's digest, from either client, and returned as is with ``verify=False``."""
    revision, data = pushed
    monkeypatch.setattr(parallel_fetch, "MIN_PARALLEL_RANGE", 3000)
    assert len(data) > 4 * 3000  # four ranges
    flipped = bytearray(data)
    flipped[-1] ^= 0x80
    asked: list[tuple[str, int, int]] = []

    def stream(request: pb.FetchPackRequest) -> Iterator[pb.PackChunk]:
        asked.append((request.ref, request.offset, request.length))
        end = min(len(flipped), request.offset + request.length)
        for raw in _chunks(revision, bytes(flipped[:end]), size=4096, start=request.offset):
            yield pb.PackChunk.FromString(raw)

    async def fetch_async(address: str) -> tuple[memoryview, list[tuple[int, int]]]:
        async with AsyncCatalogClient(address) as client:
            with pytest.raises(DataLoss, match="hash to"):
                await client.fetch_with_revision(revision, parallel=4)
            seen: list[tuple[int, int]] = []
            _, got = await client.fetch_with_revision(
                revision, parallel=4, verify=False, progress=lambda *p: seen.append(p)
            )
            return got, seen

    with fake_catalog(stream) as address:
        with CatalogClient(address, colocated=False) as client:
            with pytest.raises(DataLoss, match="hash to"):
                client.fetch_with_revision(revision, parallel=4)
            assert client.fetch_with_revision(revision, parallel=4, verify=False)[1] == flipped
        got, seen = asyncio.run(fetch_async(address))
    assert got == flipped and got.readonly
    assert len(seen) == 4 and seen[-1] == (len(data), len(data))
    span = -(-len(data) // 4)
    ranges = {
        (f"{revision.adapter}@{revision.digest}", at, span) for at in range(0, len(data), span)
    }
    assert len(ranges) == 4 and set(asked) == ranges and len(asked) == 4 * 4


def test_a_stream_cut_short_is_data_loss(pushed):
    revision, data = pushed

    def stream(request: pb.FetchPackRequest) -> Iterator[pb.PackChunk]:
        for raw in _chunks(revision, data, size=4096)[:2]:
            yield pb.PackChunk.FromString(raw)

    with (
        fake_catalog(stream) as address,
        CatalogClient(address) as client,
        pytest.raises(DataLoss, match="ended after 8192"),
    ):
        client.fetch(revision, verify=False)
