"""What a hostile client found, one test each: trailing newlines in names, the spool after a
crash and while running, engine records, the push deadline, echoed input, non-finite weights,
and a push whose header is garbage."""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.client import CatalogClient
from catalog.digest import Digest
from catalog.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    InvalidName,
    InvalidPack,
    InvalidReference,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from catalog.identity import acting_as
from catalog.model import AdapterName, Ref
from catalog.pack import read_pack
from catalog.push_upload import Limits
from catalog.service.server import create_server, open_catalog
from tests.servers import RunningCatalog, running_catalog

HEX = "ab" * 32


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningCatalog]:
    with running_catalog(tmp_path / "root") as running:
        yield running


@pytest.mark.parametrize(
    "text",
    ["acme\n/x", "acme/x\n", "acme/x@latest\n", "acme/x@123\n", "acme/x@serving\n",
     f"acme/x@sha256:{HEX}\n", "acme/x@sha256:abababababab\n"],
)  # fmt: skip
def test_a_trailing_newline_is_refused_everywhere(text: str) -> None:
    with pytest.raises((InvalidName, InvalidReference)):
        Ref.parse(text)
    with pytest.raises(InvalidReference):
        Digest.parse(f"sha256:{HEX}\n")


def test_aliases_with_a_newline_are_not_stored(
    served: RunningCatalog, packs: dict[str, bytes]
) -> None:
    with served.client() as client:
        client.push("acme/x", packs["qv-r4"])
        for alias in ("latest\n", "123\n", "serving\n"):
            with pytest.raises(InvalidArgument):
                client.set_alias("acme/x", alias, 1)
            with pytest.raises(InvalidArgument):
                client.push("acme/y", packs["qv-r4"], aliases=[alias])
        assert client.resolve("acme/x").aliases == ("latest",)
        assert [str(a.adapter) for a in client.iter_adapters()] == ["acme/x"]


def test_the_spool_is_swept_at_start(tmp_path: Path) -> None:
    root = tmp_path / "root"
    open_catalog(root).close()
    left = [root / "spool" / f"push-crash{i}.pack" for i in range(3)]
    for path in left:
        path.write_bytes(b"\0" * 4096)
    catalog = open_catalog(root)
    try:
        assert list((root / "spool").iterdir()) == []
        # a second catalog on the same root (a tool beside a running server) leaves its
        # spool alone: those files would be the server's pushes in flight
        left[0].write_bytes(b"in flight")
        second = open_catalog(tmp_path / "other")
        second.close()
        from catalog.spool import PushSpool

        beside = PushSpool(root / "spool", 1 << 20)
        assert beside.sweep() == (0, 0) and left[0].exists()
        beside.close()
    finally:
        catalog.close()


def test_the_spool_is_bounded_while_running(tmp_path: Path, packs: dict[str, bytes]) -> None:
    data = packs["qv-r4"]
    catalog = open_catalog(tmp_path / "root", limits=Limits(max_spool_bytes=len(data) + 100))
    try:
        first = catalog.open_push(AdapterName("acme", "a"), size_bytes=len(data))
        with pytest.raises(ResourceExhausted, match="push spool holds"):
            catalog.open_push(AdapterName("acme", "b"), size_bytes=len(data))
        with first:
            first.write(data)
            first.commit()
        # released: the next push fits again
        with catalog.open_push(AdapterName("acme", "b"), size_bytes=len(data)) as second:
            second.write(data)
            assert second.commit()[0].number == 1
        assert catalog.spool.held_bytes == 0
    finally:
        catalog.close()
    roomy = open_catalog(
        tmp_path / "roomy", limits=Limits(max_pack_bytes=1 << 60, max_spool_bytes=1 << 60)
    )
    try:
        with pytest.raises(ResourceExhausted, match="do not fit on the spool's disk"):
            roomy.open_push(AdapterName("acme", "c"), size_bytes=1 << 50)
        assert list(roomy.spool_dir.iterdir()) == []
    finally:
        roomy.close()


class _Clock:
    """Stands in for the ``time`` module in ``catalog.engines``: a monotonic clock we move."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


def test_engine_records_are_capped_per_principal_expire_and_stay_their_owners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr("catalog.engines.time", clock)
    catalog = open_catalog(
        tmp_path / "root", limits=Limits(max_engines_per_principal=3, engine_ttl_s=600)
    )
    try:
        with acting_as("mallory"):
            for i in range(3):
                catalog.register_engine(f"m-{i}", "base", 4, 8, 0)
            catalog.register_engine("m-0", "base", 4, 8, 0)  # re-registering is no new record
            with pytest.raises(ResourceExhausted, match="mallory already has 3 engines"):
                catalog.register_engine("m-3", "base", 4, 8, 0)
            with pytest.raises(InvalidArgument, match="at most 4096 per tier"):
                catalog.report_residency("m-0", [f"sha256:{HEX}"] * 4097, [])
        clock.now += 400
        with acting_as("mallory"):
            catalog.report_residency("m-2", [], [])  # a report keeps an engine alive
        with acting_as("alice"):
            catalog.register_engine("a-0", "base", 4, 8, 0)  # another principal is not capped
            with pytest.raises(PermissionDenied):
                catalog.register_engine("m-0", "base", 4, 8, 0)
            with pytest.raises(NotFound):  # another's engine is not shown to exist
                catalog.report_residency("m-0", [], [])
        assert len(catalog.engines()) == 4
        clock.now += 300  # m-0 and m-1 are now quiet past the TTL; m-2 and a-0 are not
        assert sorted(e.engine_id for e in catalog.engines()) == ["a-0", "m-2"]
        with acting_as("mallory"):
            catalog.register_engine("m-3", "base", 4, 8, 0)  # room again
            with pytest.raises(NotFound):
                catalog.report_residency("m-0", [], [])  # expired: register again
    finally:
        catalog.close()


def test_a_push_past_its_deadline_is_not_committed(
    tmp_path: Path, packs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = open_catalog(tmp_path / "root")
    server, port = create_server(catalog, "127.0.0.1:0")
    slow_put = catalog.store.put_file

    def put_file_slowly(*args: object, **kwargs: object) -> object:
        time.sleep(1.5)  # a durable tier that takes longer than the client waits
        return slow_put(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog.store, "put_file", put_file_slowly)
    try:
        with CatalogClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(DeadlineExceeded):
                client.push("acme/late", packs["qv-r4"], timeout=1.0)
            time.sleep(1.5)  # the server finishes its side
            with pytest.raises(NotFound):
                client.resolve("acme/late")
        assert not any(key.startswith("log/") for key in catalog.store.list(""))
    finally:
        server.stop(grace=None).wait()
        catalog.close()


def test_huge_client_input_comes_back_as_a_bounded_precise_error(
    served: RunningCatalog, packs: dict[str, bytes]
) -> None:
    with served.client() as client:
        with pytest.raises(InvalidArgument) as refused:
            client.push("acme/x", packs["qv-r4"], base_id="b" * 100_000)
        assert "was built for" in str(refused.value) and len(str(refused.value)) < 2000
        with pytest.raises(InvalidReference) as refused:
            client.resolve("acme/x@" + "y" * 100_000)
        assert len(str(refused.value)) < 2000
        with pytest.raises(InvalidArgument) as refused:
            client.set_metadata("acme/x", {"k" * 100_000: "v"})
        assert len(str(refused.value)) < 2000
    assert served.catalog.index_is_empty()


def _with_nan(pack: bytes, value: bytes) -> tuple[bytes, str]:
    """``pack`` with element 5 of its second (F32) tensor replaced by ``value``."""
    parsed = read_pack(pack)
    name = parsed.tensor_names()[1]
    offset = pack.find(parsed.tensor(name).data.tobytes())  # random weights: one match
    del parsed
    poisoned = bytearray(pack)
    poisoned[offset + 4 * 5 : offset + 4 * 6] = value
    return bytes(poisoned), name


@pytest.mark.parametrize(
    "value", [struct.pack("<f", float("nan")), struct.pack("<f", float("inf")),
              struct.pack("<f", float("-inf"))],
)  # fmt: skip
def test_non_finite_weights_are_refused_naming_the_tensor(
    served: RunningCatalog, packs: dict[str, bytes], value: bytes
) -> None:
    poisoned, name = _with_nan(packs["qv-r4"], value)
    with served.client() as client, pytest.raises(InvalidPack) as refused:
        client.push("acme/nan", poisoned)
    assert f"tensor {name!r} holds a non-finite value" in str(refused.value)
    assert "flat index 5" in str(refused.value)
    assert served.catalog.index_is_empty()
    assert list(served.catalog.spool_dir.iterdir()) == []


def test_a_garbage_push_is_refused_after_its_header_not_its_body(served: RunningCatalog) -> None:
    declared = 300 << 20
    sent = [0]

    def requests() -> Iterator[pb.PushRequest]:
        yield pb.PushRequest(header=pb.PushHeader(name="acme/garbage", size_bytes=declared))
        garbage = struct.pack("<Q", 64) + b"{" + b"x" * ((1 << 20) - 9)
        for _ in range(declared >> 20):
            sent[0] += len(garbage)
            yield pb.PushRequest(chunk=garbage)

    channel = grpc.insecure_channel(served.address)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.CatalogStub(channel).Push(requests(), timeout=60)
    finally:
        channel.close()
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in refused.value.details()
    # refused at the first chunk; what else the client had queued is flow control's, not ours
    assert sent[0] < 64 << 20, f"{sent[0] >> 20} MiB were taken in before the refusal"
    assert list(served.catalog.spool_dir.iterdir()) == []


def test_stats_redaction_applies_only_with_auth(served: RunningCatalog) -> None:
    # without --auth every caller is the anonymous admin: today's behaviour, path included
    with served.client() as client:
        assert client.stats()["store_url"].startswith("file:///")


def test_an_engine_watching_hints_does_not_expire(
    served: RunningCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr("catalog.engines.time", clock)
    ttl = served.catalog.limits.engine_ttl_s
    with served.client() as client:
        client.register_engine("quiet", "base", 4, 8)
        stream = client.watch_hints("quiet")

        def read_until_cancelled() -> None:
            with contextlib.suppress(Cancelled):  # how a cancelled stream ends
                list(stream)

        reader = threading.Thread(target=read_until_cancelled, daemon=True)
        reader.start()

        def watchers() -> int:
            return sum(e.watchers for e in served.catalog.engines() if e.engine_id == "quiet")

        deadline = time.monotonic() + 10
        while watchers() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        clock.now += ttl + 1  # quiet past the TTL, but its hint stream is open
        assert [e.engine_id for e in served.catalog.engines()] == ["quiet"]
        stream.cancel()
        reader.join(10)
        deadline = time.monotonic() + 10
        while watchers() and time.monotonic() < deadline:
            time.sleep(0.01)
        clock.now += ttl + 1  # closed, and quiet again past the TTL
        assert served.catalog.engines() == []
