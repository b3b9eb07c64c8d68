"""Colocated pushes through the catalog's inbox (``catalog.local_push``,
``catalog.client.local_push``), over real gRPC: what is linked, what is copied, what is
refused, and when the client streams instead."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.client import CatalogClient
from catalog.client import local_push as client_side
from catalog.client.errors import translated
from catalog.errors import Conflict, InvalidArgument, InvalidPack, NotFound
from catalog.local_push import PushInbox
from tests.servers import RunningCatalog


def inbox_of(served: RunningCatalog) -> Path:
    return served.root / "inbox"


def push_files(inbox: Path) -> list[Path]:
    """What the inbox holds beside the warm files the catalog keeps (``catalog.warm_inbox``)."""
    return [p for p in inbox.iterdir() if not p.name.startswith("warm-")]


def blob_files(served: RunningCatalog) -> list[Path]:
    return [p for p in (served.root / "store").rglob("*") if p.is_file() and "blobs" in p.parts]


def raw_push(client: CatalogClient, name: str, file_name: str, size: int) -> pb.PushResponse:
    with translated(client.target):
        return client._stub.PushFromInbox(
            pb.PushFromInboxRequest(
                header=pb.PushHeader(name=name, size_bytes=size), file_name=file_name
            ),
            timeout=10,
        )


def test_a_colocated_push_names_a_file_that_is_linked_not_copied(served, packs):  # type: ignore[no-untyped-def]
    pack = packs["all-r8"]
    with CatalogClient(served.address) as client:
        pushed = client.push("acme/local", pack)
        assert pushed.created and client._inbox is not None
        assert client._inbox.counters == {"pushes": 1, "fallbacks": 0, "warm": 0}
        assert bytes(client.fetch("acme/local")) == pack
    assert push_files(inbox_of(served)) == []  # taken, nothing left behind
    assert list((served.root / "spool").glob("push-*")) == []
    [blob] = blob_files(served)
    # The inbox file itself, now the store's (mode as a written blob, one link: the inbox's
    # name is gone), and admitted to the tier.
    assert blob.read_bytes() == pack and blob.stat().st_nlink == 1
    assert oct(blob.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert served.catalog.stats()["counters"]["nvme_admitted_at_push"] == 1


def test_colocated_false_streams(served, packs):  # type: ignore[no-untyped-def]
    with CatalogClient(served.address, colocated=False) as client:
        assert client._inbox is None
        assert client.push("acme/streamed", packs["qv-r4"]).created
    assert not inbox_of(served).exists()  # never asked for


def test_a_client_on_another_host_streams(served, packs, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(client_side, "host_id", lambda: "elsewhere/boot")
    with CatalogClient(served.address) as client:
        assert client.push("acme/remote", packs["qv-r4"]).created
        assert client._inbox is not None and client._inbox.directory() is None
        assert client._inbox.reason == "the catalog runs on another host"
        assert client._inbox.counters["pushes"] == 0


@pytest.mark.parametrize(
    "file_name",
    ["../index/data.mdb", "push-abcdefgh.pack/..", "/etc/passwd", "push-a.pack", "x.pack", ""],
)
def test_only_inbox_names_are_taken(served, file_name):  # type: ignore[no-untyped-def]
    with CatalogClient(served.address) as client, pytest.raises(InvalidArgument, match="inbox"):
        raw_push(client, "acme/bad", file_name, 10)


def test_a_symlink_a_second_link_or_another_size_is_refused(served, packs, tmp_path):  # type: ignore[no-untyped-def]
    pack = packs["qv-r4"]
    outside = tmp_path / "outside.pack"
    outside.write_bytes(pack)
    with CatalogClient(served.address) as client:
        inbox = client._inbox.directory()  # type: ignore[union-attr]
        assert inbox is not None
        (inbox / "push-symlinked.pack").symlink_to(outside)
        with pytest.raises(InvalidArgument, match="cannot open"):
            raw_push(client, "acme/bad", "push-symlinked.pack", len(pack))
        os.link(outside, inbox / "push-hardlink.pack")
        with pytest.raises(InvalidArgument, match="one link"):
            raw_push(client, "acme/bad", "push-hardlink.pack", len(pack))
        (inbox / "push-shorterfile.pack").write_bytes(pack)
        with pytest.raises(InvalidArgument, match="declared"):
            raw_push(client, "acme/bad", "push-shorterfile.pack", len(pack) + 1)
        with pytest.raises(NotFound):
            raw_push(client, "acme/bad", "push-nosuchfile.pack", len(pack))
        assert client.list_adapters().items == ()
    assert outside.read_bytes() == pack  # never linked, changed nor removed
    assert blob_files(served) == []


def test_a_bad_pack_from_the_inbox_leaves_nothing(served, packs):  # type: ignore[no-untyped-def]
    bad = bytearray(packs["qv-r4"])
    bad[:8] = b"\xff" * 8  # the header length
    with CatalogClient(served.address) as client:
        with pytest.raises(InvalidPack):
            client.push("acme/bad", bytes(bad))
        assert client._inbox is not None and client._inbox.counters["pushes"] == 0
        assert client.list_adapters().items == ()
    assert push_files(inbox_of(served)) == []
    assert blob_files(served) == []
    assert served.catalog.stats()["counters"]["nvme_admitted_at_push"] == 0


def test_a_file_someone_still_writes_is_copied_as_hashed(served, packs):  # type: ignore[no-untyped-def]
    pack = packs["all-r8"]
    with CatalogClient(served.address) as client:
        inbox = client._inbox.directory()  # type: ignore[union-attr]
        assert inbox is not None
        path = inbox / "push-still-open.pack"
        with open(path, "wb") as writer:
            writer.write(pack)
            writer.flush()
            # Open for writing: no lease, so the catalog copies what it hashes.
            revision = raw_push(client, "acme/copied", path.name, len(pack)).revision
            writer.seek(100)
            writer.write(b"changed after the push")
            writer.flush()
        assert bytes(client.fetch("acme/copied")) == pack
        assert revision.digest.startswith("sha256:")
        assert client.verify()["problems"] == []
    [blob] = blob_files(served)
    assert blob.read_bytes() == pack


def test_a_writer_opening_the_file_during_the_push_refuses_it(tmp_path, packs):  # type: ignore[no-untyped-def]
    inbox = PushInbox(tmp_path / "inbox")
    path = inbox.directory / "push-raced-file.pack"
    path.write_bytes(packs["qv-r4"])
    taken = inbox.take(path.name, len(packs["qv-r4"]), "push of acme/raced")
    assert taken.leased
    taken.check_unbroken("push of acme/raced")  # nobody asked yet
    opened = threading.Event()

    def writer() -> None:
        with open(path, "r+b"):  # blocks until the lease is let go
            opened.set()

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.2)
    assert not opened.is_set()
    with pytest.raises(Conflict, match="opened for writing"):
        taken.check_unbroken("push of acme/raced")
    taken.close()  # unlinks the name first, then lets go: the writer gets the old file
    thread.join(10)
    assert opened.is_set() and not path.exists()
    inbox.close()


def test_an_older_catalog_without_the_rpc_is_streamed_to(served, packs, monkeypatch):  # type: ignore[no-untyped-def]
    class Unimplemented(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNIMPLEMENTED

    with CatalogClient(served.address) as client:
        inbox = client._inbox
        assert inbox is not None

        def no_rpc(*args: object, **kwargs: object) -> None:
            raise Unimplemented()

        monkeypatch.setattr(inbox._stub, "GetPushInbox", no_rpc)
        assert client.push("acme/old", packs["qv-r4"]).created
        assert inbox.directory() is None and "UNIMPLEMENTED" in inbox.reason


def test_stale_inbox_files_are_swept(tmp_path):  # type: ignore[no-untyped-def]
    inbox = PushInbox(tmp_path / "inbox")
    old, new = inbox.directory / "push-left-behind.pack", inbox.directory / "push-in-flight.pack"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert inbox.sweep() == 1
    assert not old.exists() and new.exists()
    assert oct(inbox.directory.stat().st_mode & 0o777) == oct(0o700)
    inbox.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_store_on_another_filesystem_gets_a_copy_of_the_leased_file(tmp_path, packs):  # type: ignore[no-untyped-def]
    import shutil
    import tempfile

    from tests.servers import running_catalog

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    elsewhere = Path(tempfile.mkdtemp(prefix="loracat-test-", dir=shm))
    try:
        pack = packs["all-r8"]
        with (
            running_catalog(tmp_path / "root", (elsewhere / "store").as_uri()) as served,
            CatalogClient(served.address) as client,
        ):
            assert client.push("acme/far", pack).created
            assert client._inbox is not None and client._inbox.counters["pushes"] == 1
            assert bytes(client.fetch("acme/far")) == pack
            assert push_files(tmp_path / "root" / "inbox") == []
        [blob] = [p for p in (elsewhere / "store").rglob("*") if p.is_file() and "blobs" in p.parts]
        assert blob.read_bytes() == pack
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:51234", True),
        ("ipv6:[::1]:51234", True),
        ("unix:/run/loracat.sock", True),
        ("ipv4:10.0.0.7:51234", False),
        ("ipv6:[2001:db8::1]:443", False),
        ("", False),
    ],
)
def test_only_callers_on_this_host_are_told_the_inbox(peer: str, local: bool) -> None:
    from catalog.local_push import is_local_peer

    assert is_local_peer(peer) is local


def test_the_client_writes_the_inbox_file_whole(tmp_path: Path) -> None:
    data = os.urandom((6 << 20) + 12345)
    client_side._write_new(tmp_path / "push-mappedcopy.pack", data)
    assert (tmp_path / "push-mappedcopy.pack").read_bytes() == data
    source = tmp_path / "trainer.pack"
    source.write_bytes(data[:1000])
    client_side._write_new(tmp_path / "push-fromafile.pack", source)
    assert (tmp_path / "push-fromafile.pack").read_bytes() == data[:1000]


def test_the_client_writes_a_laid_out_pack_whole(tmp_path: Path, packs, adapter_dirs) -> None:  # type: ignore[no-untyped-def]
    from catalog.pack import plan_peft_dir
    from tests.service.conftest import BASE_ID

    plan = plan_peft_dir(adapter_dirs["all-r8"], base_id=BASE_ID)
    client_side._write_new(tmp_path / "push-laidoutpack.pack", plan)
    assert (tmp_path / "push-laidoutpack.pack").read_bytes() == packs["all-r8"]
