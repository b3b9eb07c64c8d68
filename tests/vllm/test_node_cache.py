"""The node-local directory cache: single flight across processes, atomic writes, a budget that
never evicts what a process holds. Real files, real processes, real flock locks."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from catalog.errors import InvalidArgument, InvalidReference
from engine_plugin.vllm.node_cache import PeftDirCache, dir_key

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
