"""Warm inbox files (``catalog.warm_inbox``, ``catalog.client.local_push``), over real gRPC
and real files: a colocated push claims a file the catalog prepared and writes over it, the
catalog refills after each push, and every path commits exactly the pushed bytes."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.client import local_push as client_side
from catalog.pack import import_peft_dir
from catalog.service.server import create_server, open_catalog
from catalog.warm_inbox import WARM_NAME, WarmFiles, WarmPolicy
from tests.servers import RunningCatalog, serve_subprocess
from tests.service.conftest import BASE_ID

MiB = 1 << 20


@contextmanager
def warm_catalog(root: Path, policy: WarmPolicy | None = None) -> Iterator[RunningCatalog]:
    """A catalog served in this process whose push inbox keeps warm files as ``policy`` says
    (None: the product's default)."""
    catalog = open_catalog(root)
    server, port = create_server(catalog, "127.0.0.1:0", warm_inbox=policy)
    try:
        yield RunningCatalog(catalog, f"127.0.0.1:{port}", root)
    finally:
        server.stop(grace=None).wait()
        catalog.close()


def warm_files(root: Path) -> dict[str, os.stat_result]:
    """The ready warm files in the inbox under ``root``: name -> stat."""
    inbox = root / "inbox"
    found = {}
    for path in inbox.glob("warm-*.pack") if inbox.exists() else ():
        try:
            found[path.name] = path.stat()
        except FileNotFoundError:
            continue
    return found


def wait_for_warm(root: Path, count: int, min_bytes: int) -> dict[str, os.stat_result]:
    """Until the inbox holds ``count`` warm files of at least ``min_bytes`` (a refill runs
    on the catalog's own thread after a push); fails after a generous deadline."""
    deadline = time.monotonic() + 60
    while True:
        found = warm_files(root)
        if len(found) == count and all(s.st_size >= min_bytes for s in found.values()):
            return found
        assert time.monotonic() < deadline, f"no {count} warm files >= {min_bytes}: {found}"
        time.sleep(0.02)


def store_file_of(root: Path, pack: bytes) -> Path:
    """The durable store's file holding ``pack``."""
    digest = hashlib.sha256(pack).hexdigest()
    [path] = [p for p in (root / "store").rglob(f"*{digest}*") if p.is_file()]
    return path


def test_a_push_claims_a_warm_file_and_commits_its_own_bytes(tmp_path, packs, adapter_dirs):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    with warm_catalog(root) as served, CatalogClient(served.address) as client:
        assert warm_files(root) == {}  # no capacity before the first push
        first = client.push("acme/warm", packs["qv-r4"])
        assert client._inbox is not None and client._inbox.counters["warm"] == 0
        ready = wait_for_warm(root, 2, MiB)  # rounded up to whole MiB
        inodes = {s.st_ino for s in ready.values()}

        second = packs["all-r8"]
        pushed = client.push("acme/warm", second)
        assert pushed.created and client._inbox.counters == {
            "pushes": 2,
            "fallbacks": 0,
            "warm": 1,
        }
        assert pushed.revision.digest.hex == hashlib.sha256(second).hexdigest()
        assert bytes(client.fetch("acme/warm")) == second
        assert bytes(client.fetch(f"acme/warm@{first.revision.number}")) == packs["qv-r4"]
        # The store's file is the warm file itself (linked, not copied), cut to the pack.
        stored = store_file_of(root, second).stat()
        assert stored.st_ino in inodes and stored.st_size == len(second)
        assert len(set(ready) - set(warm_files(root))) == 1  # the claimed one is gone
        assert client.verify()["problems"] == []
    assert [p.name for p in (root / "inbox").glob("push-*")] == []


def test_the_inbox_is_refilled_after_each_push(tmp_path, adapter_dirs):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    directories = [adapter_dirs[key] for key in ("qv-r4", "all-r8", "down-r2", "qv-r4")]
    with warm_catalog(root) as served, CatalogClient(served.address) as client:
        seen: set[str] = set()
        for i, directory in enumerate(directories):
            pushed = client.push_peft_dir(f"acme/refilled-{i}", directory, base_id=BASE_ID)
            assert pushed.created
            expected = import_peft_dir(directory, base_id=BASE_ID)
            assert bytes(client.fetch(f"acme/refilled-{i}")) == expected
            now = wait_for_warm(root, 2, MiB)
            assert set(now) - seen  # at least one new file since the last push
            seen |= set(now)
        assert client._inbox is not None and client._inbox.counters["warm"] == 3


def test_a_pack_larger_than_the_warm_capacity(tmp_path, packs):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    capacity = 4096
    big = packs["all-r8"]
    assert len(big) > 2 * capacity
    with (
        warm_catalog(root, WarmPolicy(files=1, max_bytes=capacity)) as served,
        CatalogClient(served.address) as client,
    ):
        client.push("acme/small", packs["down-r2"])
        [ready] = wait_for_warm(root, 1, capacity).values()
        assert ready.st_size == capacity  # the cap, below a whole MiB
        pushed = client.push("acme/big", big)
        assert client._inbox is not None and client._inbox.counters["warm"] == 1
        assert bytes(client.fetch("acme/big")) == big
        stored = store_file_of(root, big).stat()
        assert stored.st_ino == ready.st_ino and stored.st_size == len(big)
        assert pushed.revision.size_bytes == len(big)


def test_two_clients_racing_for_one_warm_file_both_commit(tmp_path, packs, monkeypatch):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    with warm_catalog(root, WarmPolicy(files=1)) as served:
        with CatalogClient(served.address) as first:
            first.push("acme/seed", packs["down-r2"])
        [name] = wait_for_warm(root, 1, MiB)
        # Both clients list the one warm file, then both try to claim it at once.
        listed = client_side._warm_candidates
        both_listed = threading.Barrier(2, timeout=30)

        def candidates(directory: Path, size: int) -> list[str]:
            names = listed(directory, size)
            both_listed.wait()
            return names

        monkeypatch.setattr(client_side, "_warm_candidates", candidates)
        results: dict[str, object] = {}

        def push(key: str) -> None:
            try:
                with CatalogClient(served.address) as client:
                    pushed = client.push(f"acme/race-{key}", packs[key])
                    assert client._inbox is not None
                    results[key] = (pushed, client._inbox.counters["warm"])
            except BaseException as exc:  # reported below
                results[key] = exc

        threads = [threading.Thread(target=push, args=(key,)) for key in ("qv-r4", "all-r8")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        outcomes = {key: value for key, value in results.items()}
        assert all(isinstance(v, tuple) for v in outcomes.values()), outcomes
        pushes = {key: value[0] for key, value in outcomes.items()}  # type: ignore[index]
        warm_used = sum(value[1] for value in outcomes.values())  # type: ignore[index]
        assert warm_used == 1  # exactly one claimer won; the other wrote a new file
        assert pushes["qv-r4"].revision.digest != pushes["all-r8"].revision.digest
        with CatalogClient(served.address, colocated=False) as reader:
            for key in ("qv-r4", "all-r8"):
                assert bytes(reader.fetch(f"acme/race-{key}")) == packs[key]
        assert name not in warm_files(root)


def test_no_warm_files_when_serve_turns_them_off(tmp_path, packs):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    root.mkdir()
    with (
        serve_subprocess(root, extra_args=["--push-warm-files", "0"]) as (_, address),
        CatalogClient(address) as client,
    ):
        for key in ("qv-r4", "all-r8", "down-r2"):
            assert client.push(f"acme/cold-{key}", packs[key]).created
            assert warm_files(root) == {}
        assert client._inbox is not None
        assert client._inbox.counters == {"pushes": 3, "fallbacks": 0, "warm": 0}
    assert list((root / "inbox").glob("warm-*")) == []


def test_a_restart_replaces_leftover_warm_files(tmp_path, packs):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    inbox = root / "inbox"
    inbox.mkdir(parents=True, mode=0o700)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not the catalog's")
    leftover = inbox / "warm-leftover0001.pack"
    leftover.write_bytes(b"\x01" * (2 * MiB + 5))  # what a previous run left ready
    crashed = inbox / "warm-crashed00001.tmp"  # a crash mid-prepare
    crashed.write_bytes(b"\x02" * 100)
    (inbox / "warm-symlinked01.pack").symlink_to(outside)
    with warm_catalog(root) as served:
        # Handled when the server starts (the inbox was used before), before any client.
        assert not crashed.exists() and not leftover.exists()
        assert not (inbox / "warm-symlinked01.pack").is_symlink()
        ready = wait_for_warm(root, 2, 3 * MiB)  # the leftover's size, in whole MiB
        assert {s.st_size for s in ready.values()} == {3 * MiB}
        with CatalogClient(served.address) as client:
            pushed = client.push("acme/after-restart", packs["qv-r4"])
            assert pushed.created and client._inbox is not None
            assert client._inbox.counters["warm"] == 1
            assert bytes(client.fetch("acme/after-restart")) == packs["qv-r4"]
    assert outside.read_bytes() == b"not the catalog's"


def test_a_claimed_file_that_is_not_plain_is_skipped(tmp_path, packs):  # type: ignore[no-untyped-def]
    """A symlink or a second link named like a warm file is never written through."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * 100)
    (inbox / "warm-symlinked01.pack").symlink_to(outside)
    os.link(outside, inbox / "warm-hardlink001.pack")
    target = inbox / "push-mine0000001.pack"
    assert client_side._claim_warm(inbox, target, 10) is None
    assert outside.read_bytes() == b"x" * 100 and outside.stat().st_nlink == 1
    assert list(inbox.iterdir()) == []


@pytest.mark.parametrize(
    ("capacity", "size"), [(3 * MiB, MiB + 7), (4096, 3 * 4096 + 1), (MiB, MiB)]
)
def test_writing_over_a_warm_file_leaves_exactly_the_pack(tmp_path, capacity, size):  # type: ignore[no-untyped-def]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with open(inbox / "warm-prepared001.pack", "wb") as f:
        f.write(b"\xee" * capacity)  # old bytes that must not survive
    data = os.urandom(size)
    target = inbox / "push-mine0000001.pack"
    fd = client_side._claim_warm(inbox, target, size)
    assert fd is not None
    client_side._write_into(fd, data)
    assert target.read_bytes() == data
    assert not (inbox / "warm-prepared001.pack").exists()


def wait_for_sizes(directory: Path, sizes: list[int]) -> None:
    deadline = time.monotonic() + 60
    while sorted(s.st_size for s in warm_files(directory.parent).values()) != sizes:
        assert time.monotonic() < deadline, warm_files(directory.parent)
        time.sleep(0.02)


def test_the_capacity_follows_the_largest_recent_push_within_the_cap(tmp_path):  # type: ignore[no-untyped-def]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    warm = WarmFiles(fd, WarmPolicy(files=2, max_bytes=6 * MiB))
    try:
        assert warm.capacity() == 0
        warm.pushed(None)  # a failed push teaches nothing, and nothing is made
        warm.pushed(MiB + 1)
        wait_for_sizes(inbox, [2 * MiB, 2 * MiB])
        warm.pushed(5 * MiB)  # the smaller files are replaced
        wait_for_sizes(inbox, [5 * MiB, 5 * MiB])
        warm.pushed(100 * MiB)  # capped
        wait_for_sizes(inbox, [6 * MiB, 6 * MiB])
        for _ in range(8):  # the large pushes are no longer recent
            warm.pushed(MiB)
        wait_for_sizes(inbox, [MiB, MiB])  # files over twice the capacity are replaced
        assert warm.counters["made"] == 8 and warm.counters["errors"] == 0
        assert [p.name for p in inbox.iterdir() if not WARM_NAME.fullmatch(p.name)] == []
    finally:
        warm.close()
        os.close(fd)


def test_a_refill_that_fails_is_logged_and_the_next_one_still_runs(tmp_path):  # type: ignore[no-untyped-def]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    warm = WarmFiles(fd, WarmPolicy(files=1))
    try:
        inbox.rmdir()  # files can no longer be made in it
        warm.pushed(MiB)
        deadline = time.monotonic() + 60
        while warm.counters["errors"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        warm.pushed(MiB)  # the failure did not stop refills
        while warm.counters["errors"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert warm.counters["made"] == 0
    finally:
        warm.close()
        os.close(fd)


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` over a mapping of it,
    which itself touches none)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vector) / pages


@pytest.mark.parametrize("sendfile", [True, False])
def test_a_warm_file_is_in_the_page_cache_when_it_is_ready(tmp_path, monkeypatch, sendfile):  # type: ignore[no-untyped-def]
    if not sendfile:  # the fallback: read into a buffer

        def no_sendfile(*args: object) -> int:
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr(os, "sendfile", no_sendfile)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    warm = WarmFiles(fd, WarmPolicy(files=1))
    try:
        warm.pushed(3 * MiB)
        [(name, found)] = wait_for_warm(tmp_path, 1, 3 * MiB).items()
        assert found.st_size == 3 * MiB
        assert resident_fraction(inbox / name) == 1.0
    finally:
        warm.close()
        os.close(fd)


def test_a_refill_waits_for_quiet_after_the_last_push(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    from catalog import warm_inbox

    monkeypatch.setattr(warm_inbox, "QUIET_S", 3600.0)  # never quiet while the test runs
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    warm = WarmFiles(fd, WarmPolicy(files=1))
    try:
        warm.pushed(MiB)
        warm.pushed(MiB)
        time.sleep(0.3)  # a refill started at once would have made its file by now
        assert warm.counters["refills"] == 0 and list(inbox.iterdir()) == []
    finally:
        started = time.monotonic()
        warm.close()  # a waiting refill ends at once, nothing made
        assert time.monotonic() - started < 60
        os.close(fd)
    assert warm.counters["made"] == 0 and list(inbox.iterdir()) == []


def test_a_stopped_server_ends_its_refill(tmp_path, packs):  # type: ignore[no-untyped-def]
    import shutil

    root = tmp_path / "root"
    with warm_catalog(root) as served, served.client() as client:
        client.push("acme/stopped", packs["qv-r4"])  # a refill now waits for quiet
        assert client.push_inbox is not None and client.push_inbox.counters["pushes"] == 1
    # the server stopped: no refill thread is left to write into a root that goes away
    assert not [t for t in threading.enumerate() if t.name == "inbox-warm"]
    shutil.rmtree(root)
    time.sleep(0.5)  # past the refill's quiet wait: nothing recreates the inbox
    assert not root.exists()
