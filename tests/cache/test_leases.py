"""Holds and leases on the NVMe tier's entries (in one process; the colocated tests run the
reader in other processes)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.cache.layout import chunk_key
from catalog.cache.leases import PackLeases
from catalog.cache.pack_cache import PackCache
from catalog.digest import Digest
from catalog.errors import DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[PackCache]:
    with PackCache(tmp_path / "cache", capacity_bytes=8 << 20, sync=False) as opened:
        yield opened


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def leases(cache: PackCache, clock: FakeClock) -> Iterator[PackLeases]:
    table = PackLeases(cache, default_ttl_s=5.0, clock=clock)
    yield table
    table.close()


def pack(size: int, seed: int) -> tuple[Digest, bytes]:
    data = os.urandom(size) if seed < 0 else bytes([seed % 251]) * size
    return Digest.of(data), data


def test_a_lease_loads_a_cold_pack_once_and_keeps_it_from_eviction(
    cache: PackCache, leases: PackLeases
) -> None:
    digest, data = pack(3 << 20, -1)
    calls = []

    def loader() -> bytes:
        calls.append(1)
        return data

    first = leases.grant(digest, loader, name_for_errors="a/b@1", size_bytes=len(data))
    second = leases.grant(digest, loader, name_for_errors="a/b@1", size_bytes=len(data))
    assert first is not None and second is not None and first.lease_id != second.lease_id
    assert calls == [1] and cache.holds(digest) == 2
    with pytest.raises(FailedPrecondition, match="leased"):
        cache.evict(digest)
    # Fills that need the room cannot take a held entry.
    for seed in range(3):
        other, other_data = pack(3 << 20, seed)
        cache.read_through(other, lambda d=other_data: d, name_for_errors="fill")
    assert cache.contains(digest)
    assert leases.release(first.lease_id) is not None
    assert leases.release(first.lease_id) is None  # once
    assert leases.release(second.lease_id) is not None
    assert cache.holds(digest) == 0
    cache.evict(digest)
    assert leases.stats() == {
        "active": 0,
        "granted": 2,
        "released": 2,
        "expired": 0,
        "not_admitted": 0,
        "refused": 0,
        "stale_readers_cleared": 0,
    }


def test_an_unreleased_lease_expires(
    cache: PackCache, leases: PackLeases, clock: FakeClock
) -> None:
    digest, data = pack(1 << 20, 1)
    lease = leases.grant(digest, lambda: data, name_for_errors="a/b@1", size_bytes=len(data))
    assert lease is not None and lease.ttl_s == 5.0
    clock.now += 4.9
    assert leases.sweep() == 0 and cache.holds(digest) == 1
    clock.now += 0.2
    assert leases.sweep() == 1 and cache.holds(digest) == 0
    assert leases.release(lease.lease_id) is None
    cache.evict(digest)
    assert leases.stats()["expired"] == 1


def test_the_sweeper_thread_ends_leases_on_time(cache: PackCache) -> None:
    digest, data = pack(1 << 20, 2)
    with_real_clock = PackLeases(cache)
    try:
        lease = with_real_clock.grant(
            digest, lambda: data, name_for_errors="a/b@1", size_bytes=len(data), ttl_s=0.2
        )
        assert lease is not None
        done = threading.Event()
        for _ in range(100):  # up to 10 s; the lease is due after 0.2 s
            # The table forgets the lease first, then the cache's hold goes.
            if with_real_clock.active() == 0 and cache.holds(digest) == 0:
                done.set()
                break
            done.wait(0.1)
        assert done.is_set()
        assert with_real_clock.stats()["expired"] == 1
    finally:
        with_real_clock.close()


def test_bad_ttls_and_a_closed_table(cache: PackCache, leases: PackLeases) -> None:
    digest, data = pack(1 << 20, 3)
    for ttl in (-1.0, 601.0):
        with pytest.raises(InvalidArgument, match="600"):
            leases.grant(digest, lambda: data, name_for_errors="x", size_bytes=1, ttl_s=ttl)
    held = leases.grant(digest, lambda: data, name_for_errors="x", size_bytes=len(data))
    assert held is not None
    leases.close()
    assert cache.holds(digest) == 0  # close releases every lease


def test_a_pack_the_policy_refuses_gets_no_lease(cache: PackCache, leases: PackLeases) -> None:
    digest, data = pack(9 << 20, 4)  # over the whole capacity
    assert leases.grant(digest, lambda: data, name_for_errors="x", size_bytes=len(data)) is None
    assert leases.stats()["not_admitted"] == 1 and not cache.contains(digest)


def test_a_loader_error_reaches_every_caller(cache: PackCache, leases: PackLeases) -> None:
    digest, _ = pack(1 << 20, 5)

    def broken() -> bytes:
        raise DataLoss("the durable copy is corrupt")

    with pytest.raises(DataLoss):
        leases.grant(digest, broken, name_for_errors="x", size_bytes=1)
    assert leases.active() == 0 and cache.holds(digest) == 0


def test_a_corrupt_copy_drops_its_holds(cache: PackCache, leases: PackLeases) -> None:
    digest, data = pack(2 << 20, -1)
    lease = leases.grant(digest, lambda: data, name_for_errors="x", size_bytes=len(data))
    assert lease is not None
    # What a reader's report makes the catalog do: re-read the chunk, which fails.
    env = cache._env.lmdb
    with env.begin(write=True) as txn:
        chunks = env.open_db(b"chunks", txn=txn)
        raw = bytearray(txn.get(chunk_key(digest, 1), db=chunks))
        raw[10] ^= 0xFF
        txn.put(chunk_key(digest, 1), bytes(raw), db=chunks)
    got = cache.read_range(digest, 1 << 20, 1, lambda: data, name_for_errors="x")
    assert got == data[1 << 20 : (1 << 20) + 1]
    assert cache.holds(digest) == 0 and cache.stats()["corrupt_dropped"] == 1
    assert leases.release(lease.lease_id) is not None  # releasing after the drop is harmless


def test_leases_beyond_the_limit_are_refused(cache: PackCache, clock: FakeClock) -> None:
    digest, data = pack(1 << 20, 6)
    table = PackLeases(cache, max_active=2, clock=clock)
    try:
        held = [
            table.grant(digest, lambda: data, name_for_errors="x", size_bytes=len(data))
            for _ in range(2)
        ]
        with pytest.raises(ResourceExhausted, match="2 pack leases"):
            table.grant(digest, lambda: data, name_for_errors="x", size_bytes=len(data))
        assert cache.holds(digest) == 2 and table.stats()["refused"] == 1
        assert held[0] is not None and table.release(held[0].lease_id) is not None
        assert table.grant(digest, lambda: data, name_for_errors="x", size_bytes=len(data))
    finally:
        table.close()
