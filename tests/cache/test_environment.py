"""The pack cache's LMDB environment on a real LMDB file, with real threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import lmdb
import pytest

from catalog.cache.environment import CacheEnvironment
from catalog.errors import ResourceExhausted

# Generous: the five writes below take about a second in all once a full map's transaction
# ends without abort(), and up to ~30 s under heavy machine load (the readers and the writer
# share the GIL); with abort() one write could stall past 60 s beside three readers (py-lmdb
# 3.0, 2-core machine).
_WRITES_DEADLINE_S = 120.0
_READERS = 3


def _open(path: Path, max_map_size: int = 64 << 20) -> CacheEnvironment:
    return CacheEnvironment(path, map_size=1 << 20, max_map_size=max_map_size, sync=False)


def _value(env: CacheEnvironment, key: bytes) -> bytes | None:
    def read(txn: lmdb.Transaction[bytes]) -> bytes | None:
        found = txn.get(key, db=env.chunks)
        return None if found is None else bytes(found)

    return env.read(read)


def _overflowing_write(env: CacheEnvironment, label: int) -> None:
    """Two values of half the current map each: more than the map holds, so the first try
    finds it full and the write is retried after the map grows."""
    value = bytes(env.map_size() // 2)

    def work(txn: lmdb.Transaction[bytes]) -> None:
        for part in range(2):
            txn.put(b"big-%d-%d" % (label, part), value, db=env.chunks)

    env.write(work)


def test_a_full_map_grows_while_other_threads_read(tmp_path: Path) -> None:
    # py-lmdb 3.0's Transaction.abort() of a write transaction stalls while other threads run
    # read transactions back to back; a write that finds the map full must not abort() it.
    env = _open(tmp_path / "cache")
    env.write(lambda txn: txn.put(b"k", b"v", db=env.chunks))
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                assert _value(env, b"k") == b"v"
        except BaseException as exc:  # reported below
            errors.append(exc)

    written = threading.Event()

    def write() -> None:
        try:
            for label in range(5):
                _overflowing_write(env, label)
        except BaseException as exc:  # reported below
            errors.append(exc)
        written.set()

    readers = [threading.Thread(target=read) for _ in range(_READERS)]
    writer = threading.Thread(target=write)
    for thread in [*readers, writer]:
        thread.start()
    started = time.monotonic()
    try:
        in_time = written.wait(_WRITES_DEADLINE_S)
    finally:
        stop.set()  # a stalled abort() finishes once the readers stop
        for thread in [*readers, writer]:
            thread.join()
    took = time.monotonic() - started
    assert in_time, f"5 writes that grew the map took {took:.1f} s beside busy readers"
    assert errors == []
    assert env.map_size() >= 32 << 20
    assert env.read(lambda txn: txn.stat(env.chunks)["entries"]) == 1 + 5 * 2
    env.close()


def test_a_write_beyond_max_map_size_writes_nothing(tmp_path: Path) -> None:
    env = _open(tmp_path / "cache", max_map_size=2 << 20)
    env.write(lambda txn: txn.put(b"k", b"v", db=env.chunks))
    with pytest.raises(ResourceExhausted, match="max_map_size"):
        env.write(lambda txn: txn.put(b"big", bytes(4 << 20), db=env.chunks))
    assert env.read(lambda txn: txn.stat(env.chunks)["entries"]) == 1
    env.write(lambda txn: txn.put(b"k2", b"v2", db=env.chunks))  # still writable
    assert env.read(lambda txn: txn.stat(env.chunks)["entries"]) == 2
    env.close()


def test_an_unexpected_error_in_a_write_discards_it(tmp_path: Path) -> None:
    env = _open(tmp_path / "cache")

    def half_then_fail(txn: lmdb.Transaction[bytes]) -> None:
        txn.put(b"half", b"written", db=env.chunks)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        env.write(half_then_fail)
    assert _value(env, b"half") is None
    env.write(lambda txn: txn.put(b"k", b"v", db=env.chunks))
    assert _value(env, b"k") == b"v"
    env.close()
