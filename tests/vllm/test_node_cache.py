"""The node-local directory cache: single flight across processes, atomic writes, a budget that
never evicts what a process holds. Real files, real processes, real flock locks."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from catalog.digest import Digest
from catalog.errors import DataLoss, InvalidArgument, InvalidReference
from engine_plugin.vllm import node_cache
from engine_plugin.vllm.node_cache import (
    BOOT_MARKER,
    DURABLE_MARK,
    PeftDirCache,
    current_boot_id,
    dir_key,
)

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
DIGEST_C = "sha256:" + "c" * 64


def writer(size: int, log: Path | None = None, delay: float = 0.0):  # type: ignore[no-untyped-def]
    """A ``write`` callback: one file of ``size`` bytes; appends a line to ``log`` per call."""

    def write(into: Path) -> int:
        if log is not None:
            with open(log, "a") as handle:
                handle.write(f"{os.getpid()}\n")
        time.sleep(delay)
        (into / "adapter_model.safetensors").write_bytes(b"x" * size)
        (into / "adapter_config.json").write_text("{}")
        return size

    return write


def test_acquire_writes_once_and_holds(tmp_path: Path) -> None:
    cache = PeftDirCache(tmp_path / "c")
    log = tmp_path / "writes"
    first = cache.acquire(DIGEST_A, writer(100, log))
    second = cache.acquire(DIGEST_A, writer(100, log))
    assert first == second == tmp_path.resolve() / "c" / "adapters" / dir_key(DIGEST_A)
    assert (first / "adapter_model.safetensors").stat().st_size == 100
    assert log.read_text().count("\n") == 1
    assert cache.held() == [DIGEST_A]
    cache.release(DIGEST_A)
    assert cache.held() == [DIGEST_A]  # holds nest
    cache.release(DIGEST_A)
    assert cache.held() == []
    with pytest.raises(KeyError):
        cache.release(DIGEST_A)


def test_a_digest_is_the_only_way_to_a_path(tmp_path: Path) -> None:
    cache = PeftDirCache(tmp_path / "c")
    for bad in ("../../etc", "sha256:../../x", "sha256:" + "A" * 64, "md5:" + "a" * 32):
        with pytest.raises(InvalidReference):
            cache.acquire(bad, writer(1))
    assert list((tmp_path / "c" / "adapters").iterdir()) == []


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    cache = PeftDirCache(tmp_path / "c")

    def broken(into: Path) -> int:
        (into / "adapter_config.json").write_text("{}")
        raise OSError("network gone")

    with pytest.raises(OSError, match="network gone"):
        cache.acquire(DIGEST_A, broken)
    assert list((tmp_path / "c" / "adapters").iterdir()) == []
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    assert cache.held() == []
    # and the next attempt writes it
    assert cache.acquire(DIGEST_A, writer(10)).is_dir()


def _crash_mid_write(root: str) -> None:
    cache = PeftDirCache(root)

    def dies(into: Path) -> int:
        (into / "adapter_model.safetensors").write_bytes(b"half")
        os._exit(3)  # a crash: no cleanup runs

    cache.acquire(DIGEST_A, dies)


def test_a_crash_mid_write_leaves_no_loadable_directory(tmp_path: Path) -> None:
    root = tmp_path / "c"
    PeftDirCache(root)
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_crash_mid_write, args=(str(root),))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    assert list((root / "adapters").iterdir()) == []
    assert len(list((root / "tmp").iterdir())) == 1  # the orphan, invisible to readers
    cache = PeftDirCache(root)  # opening sweeps orphans of dead writers
    assert list((root / "tmp").iterdir()) == []
    assert cache.acquire(DIGEST_A, writer(10)).is_dir()


def _acquire_in_child(root: str, log: str, barrier) -> None:  # type: ignore[no-untyped-def]
    cache = PeftDirCache(root)
    barrier.wait()
    path = cache.acquire(DIGEST_A, writer(1000, Path(log), delay=0.3))
    assert (path / "adapter_model.safetensors").stat().st_size == 1000


def test_concurrent_first_requests_on_a_host_fetch_once(tmp_path: Path) -> None:
    root = tmp_path / "c"
    log = tmp_path / "writes"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    children = [
        ctx.Process(target=_acquire_in_child, args=(str(root), str(log), barrier)) for _ in range(4)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [c.exitcode for c in children] == [0, 0, 0, 0]
    assert log.read_text().count("\n") == 1


def _hold_until_told(root: str, ready, done) -> None:  # type: ignore[no-untyped-def]
    cache = PeftDirCache(root)
    cache.acquire(DIGEST_A, writer(100))
    ready.set()
    done.wait(60)


def test_eviction_keeps_the_budget_but_never_takes_a_held_directory(tmp_path: Path) -> None:
    root = tmp_path / "c"
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_until_told, args=(str(root), ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        cache = PeftDirCache(root, budget_bytes=250)
        cache.acquire(DIGEST_B, writer(100))
        cache.release(DIGEST_B)
        time.sleep(0.01)  # distinct last-use times
        # A is held by the other process, B by nobody; writing C (100) puts 300 bytes over
        # the 250 budget: B goes, A stays.
        cache.acquire(DIGEST_C, writer(100))
        left = {e.key for e in cache.entries()}
        assert left == {dir_key(DIGEST_A), dir_key(DIGEST_C)}
        assert cache.counters.evictions == 1
        # Over budget with everything held: nothing more goes.
        cache2 = PeftDirCache(root, budget_bytes=50)
        assert cache2.evict_to_budget() == []
    finally:
        done.set()
        holder.join(60)
    # The holder is gone: A and C (released below) are evictable now.
    cache.release(DIGEST_C)
    assert sorted(PeftDirCache(root, budget_bytes=50).evict_to_budget()) == [DIGEST_A, DIGEST_C]


def test_budget_and_policy_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        PeftDirCache(tmp_path / "c", budget_bytes=-1)
    with pytest.raises(InvalidArgument, match="unknown eviction policy"):
        PeftDirCache(tmp_path / "c", policy="nope")


BOOT_1 = "11111111-1111-1111-1111-111111111111"
BOOT_2 = "22222222-2222-2222-2222-222222222222"


def test_a_directory_from_another_boot_is_never_served(tmp_path: Path) -> None:
    root = tmp_path / "c"
    log = tmp_path / "writes"
    before = PeftDirCache(root, boot_id=BOOT_1)
    path = before.acquire(DIGEST_A, writer(100, log))
    assert (path / BOOT_MARKER).read_text() == BOOT_1
    before.acquire(DIGEST_B, writer(100, log))
    before.close()
    # A reboot: nothing was fsynced, so the files may be torn. Simulate it for A.
    (path / "adapter_model.safetensors").write_bytes(b"")
    after = PeftDirCache(root, boot_id=BOOT_2)  # opening sweeps both stale directories
    assert after.entries() == []
    assert list((root / "adapters").iterdir()) == []
    again = after.acquire(DIGEST_A, writer(100, log))  # fetched again, not served torn
    assert (again / "adapter_model.safetensors").stat().st_size == 100
    assert (again / BOOT_MARKER).read_text() == BOOT_2
    assert log.read_text().count("\n") == 3


@pytest.mark.parametrize("marker", [None, "", BOOT_1[:10], BOOT_1])
def test_a_directory_whose_marker_is_missing_torn_or_stale_is_replaced(
    tmp_path: Path, marker: str | None
) -> None:
    """What a power loss can leave after the rename (a lookup, not only the opening sweep,
    refuses it): the marker missing, empty, cut short, or naming the old boot."""
    root = tmp_path / "c"
    cache = PeftDirCache(root, boot_id=BOOT_2)
    torn = root / "adapters" / dir_key(DIGEST_A)
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"half")
    if marker is not None:
        (torn / BOOT_MARKER).write_text(marker)
    assert not cache.is_valid(torn) and cache.entries() == []
    path = cache.acquire(DIGEST_A, writer(100))
    assert (path / "adapter_model.safetensors").stat().st_size == 100
    assert cache.is_valid(path)


def test_durable_directories_survive_a_reboot(tmp_path: Path) -> None:
    root = tmp_path / "c"
    log = tmp_path / "writes"
    durable = PeftDirCache(root, fsync=True, boot_id=BOOT_1)
    path = durable.acquire(DIGEST_A, writer(100, log))
    assert (path / BOOT_MARKER).read_text() == DURABLE_MARK
    durable.close()
    after = PeftDirCache(root, boot_id=BOOT_2)
    assert [e.key for e in after.entries()] == [dir_key(DIGEST_A)]
    assert after.entries()[0].size_bytes == 102  # the adapter's files, not the bookkeeping
    assert after.acquire(DIGEST_A, writer(100, log)) == path
    assert log.read_text().count("\n") == 1


def test_without_a_boot_id_the_cache_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "boot_id").write_text(BOOT_1 + "\n")
    monkeypatch.setattr(node_cache, "BOOT_ID_PATH", tmp_path / "boot_id")
    cache = PeftDirCache(tmp_path / "c")
    assert (cache.boot_id, cache.fsync) == (BOOT_1, False)
    monkeypatch.setattr(node_cache, "BOOT_ID_PATH", tmp_path / "missing")
    assert current_boot_id() is None
    cache = PeftDirCache(tmp_path / "c")
    assert cache.fsync
    path = cache.acquire(DIGEST_A, writer(10))
    assert (path / BOOT_MARKER).read_text() == DURABLE_MARK


def test_deferred_eviction_waits_for_the_checker(tmp_path: Path) -> None:
    cache = PeftDirCache(tmp_path / "c", budget_bytes=150, defer_eviction=True)
    for digest in (DIGEST_A, DIGEST_B):
        cache.acquire(digest, writer(100))
        cache.release(digest)
        time.sleep(0.01)
    assert len(cache.entries()) == 2  # over budget until the pass
    assert cache.evict_if_due() == [DIGEST_A]
    assert cache.evict_if_due() == []  # nothing written since
    assert [e.key for e in cache.entries()] == [dir_key(DIGEST_B)]


def exporter(digest: str, size: int, log: Path | None = None, delay: float = 0.0):  # type: ignore[no-untyped-def]
    """An ``export`` callback for ``acquire_first``: writes as :func:`writer` and answers
    ``digest``, as the catalog's export answers the revision it resolved."""
    write = writer(size, log, delay)

    def export(into: Path) -> tuple[Digest, int]:
        return Digest.parse(digest), write(into)

    return export


def _first_then_by_digest_in_child(root: str, log: str, barrier) -> None:  # type: ignore[no-untyped-def]
    cache = PeftDirCache(root)
    barrier.wait()
    path = cache.acquire_first("acme/s@serving", exporter(DIGEST_A, 1000, Path(log), delay=0.3))
    if path is None:  # not the first: resolve (here: the digest is known) and acquire by it
        with open(log, "a") as handle:
            handle.write("resolved\n")
        path = cache.acquire(DIGEST_A, writer(1000, Path(log)))
    assert (path / "adapter_model.safetensors").stat().st_size == 1000
    assert cache.held() == [DIGEST_A]


def test_concurrent_first_requests_for_one_reference_export_once(tmp_path: Path) -> None:
    root = tmp_path / "c"
    log = tmp_path / "writes"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    children = [
        ctx.Process(target=_first_then_by_digest_in_child, args=(str(root), str(log), barrier))
        for _ in range(4)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [c.exitcode for c in children] == [0, 0, 0, 0]
    lines = log.read_text().splitlines()
    # One export; the three others waited for it, resolved, and found its directory.
    assert sorted(line == "resolved" for line in lines) == [False, True, True, True]
    assert list((root / "tmp").iterdir()) == []


def test_a_reference_asked_for_before_is_resolved_not_exported(tmp_path: Path) -> None:
    log = tmp_path / "writes"
    cache = PeftDirCache(tmp_path / "c")
    first = cache.acquire_first("acme/s@serving", exporter(DIGEST_A, 10, log))
    assert first == cache.root / "adapters" / dir_key(DIGEST_A)
    assert cache.held() == [DIGEST_A] and cache.counters.misses == 1
    # Another process (a cache on the same root), or this one again: the caller resolves.
    assert (
        PeftDirCache(tmp_path / "c").acquire_first("acme/s@serving", exporter(DIGEST_B, 10, log))
        is None
    )
    assert cache.acquire_first("acme/s@serving", exporter(DIGEST_B, 10, log)) is None
    assert log.read_text().count("\n") == 1
    # Another text for a digest already published: its export is discarded, the directory kept.
    again = cache.acquire_first("acme/s@1", exporter(DIGEST_A, 99, log))
    assert again == first and (first / "adapter_model.safetensors").stat().st_size == 10
    assert cache.counters.discards == 1 and list((cache.root / "tmp").iterdir()) == []


def test_a_failed_or_refused_first_export_leaves_nothing(tmp_path: Path) -> None:
    cache = PeftDirCache(tmp_path / "c")

    def fails(into: Path) -> tuple[Digest, int]:
        (into / "adapter_model.safetensors").write_bytes(b"half")
        raise DataLoss("the durable copy does not match")

    with pytest.raises(DataLoss):
        cache.acquire_first("acme/s", fails)
    assert list((cache.root / "tmp").iterdir()) == []
    assert list((cache.root / "adapters").iterdir()) == []
    # A failure marks nothing: the next request for the text tries the export again.
    assert cache.acquire_first("acme/s", exporter(DIGEST_A, 10)) is not None
    # The catalog cannot write here: None (the caller fetches), nothing left behind.
    assert cache.acquire_first("acme/t", lambda into: None) is None
    assert list((cache.root / "tmp").iterdir()) == []
