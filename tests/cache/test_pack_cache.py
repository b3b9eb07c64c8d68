"""PackCache, the NVMe tier, on real LMDB files: budget, policy order, pins, single flight,
integrity (bytes flipped on disk through lmdb), ranges, restart, and SIGKILL mid-write."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest

from catalog.cache.pack_cache import PackCache, chunk_key, entry_key
from catalog.cache.policies import DEFAULT_POLICY, POLICIES, make_policy
from catalog.digest import Digest
from catalog.errors import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

REPO = Path(__file__).resolve().parents[2]
CHUNK = 1024


@dataclass(frozen=True)
class Pack:
    digest: Digest
    data: bytes

    @property
    def name(self) -> str:
        return f"acme/p@{self.digest.short}"


def make_pack(size: int, seed: int) -> Pack:
    data = random.Random(seed).randbytes(size)
    return Pack(Digest.of(data), data)


class Loader:
    """Returns a pack's bytes and counts its calls; optionally waits or fails."""

    def __init__(self, pack: Pack, *, error: Exception | None = None) -> None:
        self.pack = pack
        self.error = error
        self.calls = 0
        self.before: Callable[[], None] = lambda: None
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            self.calls += 1
        self.before()
        if self.error is not None:
            raise self.error
        return self.pack.data


def refuse() -> bytes:
    raise AssertionError("the loader was called for a pack that should be a hit")


class CacheDir:
    """Opens caches on one directory (1 KiB chunks, LRU, no fsync unless told); closes them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened: list[PackCache] = []

    def open(self, capacity: int = 64 * CHUNK, policy: str = "lru", **options: object) -> PackCache:
        options.setdefault("chunk_bytes", CHUNK)
        options.setdefault("sync", False)  # fsync is for power loss; SIGKILL is tested with it on
        cache = PackCache(self.path, capacity, policy, **options)  # type: ignore[arg-type]
        self.opened.append(cache)
        return cache

    def close_all(self) -> None:
        for cache in self.opened:
            cache.close()

    def reopen_after(self, damage: Callable[[], None], **options: object) -> PackCache:
        """Close the caches, run ``damage`` on the closed directory, and open it again."""
        self.close_all()
        damage()
        return self.open(**options)


@pytest.fixture
def caches(tmp_path: Path) -> Iterator[CacheDir]:
    directory = CacheDir(tmp_path / "cache")
    yield directory
    directory.close_all()


def read(cache: PackCache, pack: Pack, loader: Callable[[], bytes] | None = None) -> bytes:
    return cache.read_through(pack.digest, loader or Loader(pack), name_for_errors=pack.name)


def on_disk(path: Path) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """Every (meta, chunk) record in a closed cache directory, read with lmdb directly."""
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            metas = dict(txn.cursor(db=env.open_db(b"entries", txn=txn)))
            chunks = dict(txn.cursor(db=env.open_db(b"chunks", txn=txn)))
    finally:
        env.close()
    return metas, chunks


def edit_on_disk(path: Path, edit: Callable[[lmdb.Transaction, object, object], None]) -> None:
    """Run ``edit(txn, entries_db, chunks_db)`` in a write transaction on a closed cache."""
    env = lmdb.open(str(path), max_dbs=4, map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            edit(txn, env.open_db(b"entries", txn=txn), env.open_db(b"chunks", txn=txn))
    finally:
        env.close()


def flip_byte(path: Path, digest: Digest, index: int) -> None:
    def edit(txn: lmdb.Transaction, entries: object, chunks: object) -> None:
        key = chunk_key(digest, index)
        value = bytearray(txn.get(key, db=chunks))
        value[len(value) // 2] ^= 0x5A
        txn.put(key, bytes(value), db=chunks)

    edit_on_disk(path, edit)


# -- hits, misses, budget ------------------------------------------------------------------------


def test_miss_fills_then_hits_are_served_from_disk(caches):
    cache = caches.open()
    pack = make_pack(5 * CHUNK + 17, seed=1)
    loader = Loader(pack)
    assert read(cache, pack, loader) == pack.data
    assert read(cache, pack, refuse) == pack.data
    assert read(cache, pack, refuse) == pack.data
    assert loader.calls == 1
    stats = cache.stats()
    assert stats["hits"] == 2
    assert stats["misses"] == 1
    assert stats["loads"] == stats["fills"] == 1
    assert stats["bytes"] == stats["bytes_filled"] == len(pack.data)
    assert stats["bytes_read"] == 2 * len(pack.data)
    assert stats["entries"] == 1
    assert cache.contains(pack.digest)
    [entry] = cache.entries()
    assert (entry.digest, entry.size, entry.pinned) == (pack.digest, len(pack.data), False)


def test_byte_budget_is_never_exceeded(caches):
    capacity = 20 * CHUNK
    cache = caches.open(capacity, DEFAULT_POLICY)
    rng = random.Random(7)
    packs = [make_pack(rng.randint(1, 6 * CHUNK), seed=i) for i in range(40)]
    for _ in range(300):
        pack = rng.choice(packs)
        assert read(cache, pack) == pack.data
        stats = cache.stats()
        assert stats["bytes"] <= capacity
        assert stats["bytes"] == sum(entry.size for entry in cache.entries())
    assert cache.stats()["evictions"] > 0
    cache.close()
    metas, chunks = on_disk(caches.path)
    assert len(metas) == stats["entries"]
    assert sum(len(value) for value in chunks.values()) == stats["bytes"]


def test_lru_evicts_the_least_recently_used(caches):
    cache = caches.open(capacity=12 * CHUNK, policy="lru")
    a, b, c, d = (make_pack(4 * CHUNK, seed=i) for i in range(4))
    for pack in (a, b, c):
        read(cache, pack)
    read(cache, a, refuse)  # a is now the most recent; b the least
    read(cache, d)
    assert [cache.contains(p.digest) for p in (a, b, c, d)] == [True, False, True, True]
    assert cache.stats()["evictions"] == 1


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_residency_follows_the_policy_exactly(caches, policy):
    """The cache's contents after every request equal a bare policy's driven by the protocol
    in ``catalog.cache.policies`` (admit, victims, record_insert; record_hit)."""
    capacity = 24 * CHUNK
    cache = caches.open(capacity, policy)
    reference = make_policy(policy, capacity)
    rng = random.Random(policy)
    packs = [make_pack(rng.randint(CHUNK // 2, 7 * CHUNK), seed=i) for i in range(30)]
    weights = [1 / (rank + 1) for rank in range(len(packs))]  # Zipf-like popularity
    for step in range(400):
        pack = rng.choices(packs, weights)[0]
        key, size = str(pack.digest), len(pack.data)
        if key in reference:
            reference.record_hit(key)
        elif reference.admit(key, size):
            reference.victims(size)
            reference.record_insert(key, size)
        assert read(cache, pack) == pack.data
        resident = {str(p.digest) for p in packs if cache.contains(p.digest)}
        assert resident == {str(p.digest) for p in packs if str(p.digest) in reference}, step
    assert {str(entry.digest) for entry in cache.entries()} == resident


def test_default_policy_is_the_registry_default(caches):
    assert caches.open(policy="default").stats()["policy"] == DEFAULT_POLICY


def test_a_pack_larger_than_the_capacity_is_served_but_not_cached(caches):
    cache = caches.open(capacity=8 * CHUNK)
    big = make_pack(9 * CHUNK, seed=3)
    loader = Loader(big)
    assert read(cache, big, loader) == big.data
    assert read(cache, big, loader) == big.data
    assert loader.calls == 2
    stats = cache.stats()
    assert (stats["entries"], stats["bytes"], stats["not_admitted"]) == (0, 0, 2)
    assert not cache.contains(big.digest)


# -- pins and explicit eviction -----------------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_pinned_packs_are_never_evicted(caches, policy):
    cache = caches.open(capacity=16 * CHUNK, policy=policy)
    keep = make_pack(4 * CHUNK, seed=100)
    read(cache, keep)
    cache.pin(keep.digest)
    for seed in range(60):
        read(cache, make_pack(3 * CHUNK, seed=seed))
    assert cache.contains(keep.digest)
    assert read(cache, keep, refuse) == keep.data
    stats = cache.stats()
    assert (stats["pinned"], stats["pinned_bytes"]) == (1, len(keep.data))
    [entry] = [e for e in cache.entries() if e.digest == keep.digest]
    assert entry.pins == 1

    cache.unpin(keep.digest)
    if policy == "lru":
        for seed in range(60, 66):
            read(cache, make_pack(3 * CHUNK, seed=seed))
        assert not cache.contains(keep.digest)
    else:  # frequency-aware policies may well keep it; it is evictable again all the same
        cache.evict(keep.digest)
    assert cache.stats()["pinned"] == 0


def test_pins_are_counted(caches):
    cache = caches.open()
    pack = make_pack(CHUNK, seed=1)
    read(cache, pack)
    cache.pin(pack.digest)
    cache.pin(pack.digest)
    cache.unpin(pack.digest)
    with pytest.raises(FailedPrecondition, match="pinned 1 time"):
        cache.evict(pack.digest)
    cache.unpin(pack.digest)
    with pytest.raises(FailedPrecondition, match="not pinned"):
        cache.unpin(pack.digest)
    cache.evict(pack.digest)
    assert not cache.contains(pack.digest)
    assert cache.stats()["evicted_on_request"] == 1


def test_pin_of_an_absent_pack(caches):
    cache = caches.open(capacity=10 * CHUNK)
    pack = make_pack(6 * CHUNK, seed=1)
    with pytest.raises(NotFound, match="not in the pack cache"):
        cache.pin(pack.digest)
    with pytest.raises(NotFound):
        cache.unpin(pack.digest)
    with pytest.raises(NotFound):
        cache.evict(pack.digest)

    loader = Loader(pack)
    cache.pin(pack.digest, loader, name_for_errors=pack.name)  # loads, caches, pins
    assert loader.calls == 1
    assert cache.stats()["pinned"] == 1
    other = make_pack(6 * CHUNK, seed=2)
    with pytest.raises(ResourceExhausted, match="does not fit beside the pinned"):
        cache.pin(other.digest, Loader(other), name_for_errors=other.name)
    assert not cache.contains(other.digest)
    assert cache.stats()["pinned"] == 1


def test_pin_with_a_failing_loader_pins_nothing(caches):
    cache = caches.open()
    pack = make_pack(CHUNK, seed=1)
    with pytest.raises(DataLoss):
        cache.pin(pack.digest, Loader(pack, error=DataLoss("durable copy is bad")))
    read(cache, pack)
    assert cache.stats()["pinned"] == 0


# -- single flight ------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        event.wait(0.001)


def run_concurrently(count: int, work: Callable[[], object]) -> list[object]:
    """Run ``work`` in ``count`` threads; each result, or the exception it raised."""
    results: list[object] = [None] * count

    def run(slot: int) -> None:
        try:
            results[slot] = work()
        except Exception as exc:
            results[slot] = exc

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_concurrent_misses_call_the_loader_once(caches):
    cache = caches.open()
    pack = make_pack(7 * CHUNK, seed=1)
    loader = Loader(pack)
    threads = 16
    # The one loader call holds on until every other caller is waiting on it.
    loader.before = lambda: wait_for(
        lambda: cache.stats()["coalesced"] == threads - 1, "the other callers"
    )
    results = run_concurrently(threads, lambda: read(cache, pack, loader))
    assert results == [pack.data] * threads
    assert loader.calls == 1
    stats = cache.stats()
    assert (stats["misses"], stats["loads"], stats["fills"]) == (threads, 1, 1)


def test_a_loader_failure_reaches_every_waiter_and_is_not_cached(caches):
    cache = caches.open()
    pack = make_pack(3 * CHUNK, seed=1)
    failure = DataLoss(f"pack of {pack.name} is corrupt in the durable store")
    loader = Loader(pack, error=failure)
    threads = 12
    loader.before = lambda: wait_for(
        lambda: cache.stats()["coalesced"] == threads - 1, "the other callers"
    )
    results = run_concurrently(threads, lambda: read(cache, pack, loader))
    assert all(result is failure for result in results)
    assert loader.calls == 1
    assert not cache.contains(pack.digest)
    good = Loader(pack)
    assert read(cache, pack, good) == pack.data  # the next request tries again
    assert good.calls == 1


def test_many_threads_many_packs_stay_consistent(caches):
    capacity = 30 * CHUNK
    cache = caches.open(capacity, DEFAULT_POLICY)
    packs = [make_pack(random.Random(i).randint(1, 5 * CHUNK), seed=i) for i in range(25)]
    loaders = {pack.digest: Loader(pack) for pack in packs}

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            pack = rng.choice(packs)
            if rng.random() < 0.3:
                offset = rng.randrange(len(pack.data) + 1)
                got = cache.read_range(
                    pack.digest, offset, CHUNK, loaders[pack.digest], name_for_errors=pack.name
                )
                assert got == pack.data[offset : offset + CHUNK]
            else:
                assert read(cache, pack, loaders[pack.digest]) == pack.data

    results = run_concurrently(6, lambda: worker(threading.get_ident()))
    assert results == [None] * 6
    stats = cache.stats()
    assert stats["bytes"] <= capacity
    assert stats["hits"] + stats["misses"] == 6 * 150
    resident = {entry.digest for entry in cache.entries()}
    assert resident == {pack.digest for pack in packs if cache.contains(pack.digest)}
    assert stats["bytes"] == sum(len(p.data) for p in packs if p.digest in resident)
    cache.close()
    metas, chunks = on_disk(caches.path)
    assert len(metas) == len(resident)
    assert sum(len(value) for value in chunks.values()) == stats["bytes"]


# -- integrity ----------------------------------------------------------------------------------


def test_a_flipped_byte_is_detected_dropped_and_refetched(caches):
    pack = make_pack(4 * CHUNK + 100, seed=1)
    read(caches.open(), pack)
    cache = caches.reopen_after(lambda: flip_byte(caches.path, pack.digest, 2))
    loader = Loader(pack)
    assert read(cache, pack, loader) == pack.data
    assert loader.calls == 1
    assert cache.stats()["corrupt_dropped"] == 1
    assert read(cache, pack, refuse) == pack.data  # the refetched copy is cached again
    assert cache.stats()["corrupt_dropped"] == 1


def test_a_missing_chunk_is_detected(caches):
    pack = make_pack(3 * CHUNK, seed=1)
    read(caches.open(), pack)

    def delete_chunk(txn: lmdb.Transaction, entries: object, chunks: object) -> None:
        assert txn.delete(chunk_key(pack.digest, 1), db=chunks)

    cache = caches.reopen_after(lambda: edit_on_disk(caches.path, delete_chunk))
    loader = Loader(pack)
    assert read(cache, pack, loader) == pack.data
    assert (loader.calls, cache.stats()["corrupt_dropped"]) == (1, 1)


def test_a_damaged_meta_is_dropped_on_open(caches):
    pack = make_pack(3 * CHUNK, seed=1)
    read(caches.open(), pack)

    def truncate_meta(txn: lmdb.Transaction, entries: object, chunks: object) -> None:
        key = entry_key(pack.digest)
        txn.put(key, txn.get(key, db=entries)[:-5], db=entries)

    cache = caches.reopen_after(lambda: edit_on_disk(caches.path, truncate_meta))
    stats = cache.stats()
    assert (stats["dropped_on_open"], stats["orphan_chunks_removed"]) == (1, 0)
    assert not cache.contains(pack.digest)
    cache.close()
    assert on_disk(caches.path) == ({}, {})


def test_a_pinned_corrupt_pack_keeps_its_pins_through_the_refetch(caches):
    pack = make_pack(2 * CHUNK, seed=1)
    cache = caches.open()
    read(cache, pack)
    cache.pin(pack.digest)
    cache = caches.reopen_after(lambda: flip_byte(caches.path, pack.digest, 0))
    assert read(cache, pack) == pack.data
    assert cache.stats()["corrupt_dropped"] == 1
    [entry] = cache.entries()
    assert entry.pins == 1
    with pytest.raises(FailedPrecondition):
        cache.evict(pack.digest)


def test_verify_reports_and_drops_corrupt_packs(caches):
    good, bad = make_pack(3 * CHUNK, seed=1), make_pack(3 * CHUNK, seed=2)
    cache = caches.open()
    read(cache, good)
    read(cache, bad)
    cache = caches.reopen_after(lambda: flip_byte(caches.path, bad.digest, 2))
    report = cache.verify()
    assert (report.checked, report.checked_bytes) == (1, len(good.data))
    assert report.corrupt == (bad.digest,)
    assert [entry.digest for entry in cache.entries()] == [good.digest]
    assert cache.stats()["bytes"] == len(good.data)


def test_a_loader_that_returns_no_bytes_is_an_internal_error(caches):
    cache = caches.open()
    pack = make_pack(CHUNK, seed=1)
    with pytest.raises(Internal, match="returned str"):
        cache.read_through(pack.digest, lambda: "text", name_for_errors=pack.name)  # type: ignore[arg-type, return-value]
    assert not cache.contains(pack.digest)


# -- ranges -------------------------------------------------------------------------------------


def test_ranges_read_only_the_chunks_they_touch(caches):
    pack = make_pack(6 * CHUNK + 300, seed=1)
    read(caches.open(), pack)
    cache = caches.reopen_after(lambda: flip_byte(caches.path, pack.digest, 4))

    def get(offset: int, length: int, loader: Callable[[], bytes] = refuse) -> bytes:
        return cache.read_range(pack.digest, offset, length, loader, name_for_errors=pack.name)

    data = pack.data
    # Ranges away from the damaged chunk 4 are served from the cache, damage unseen.
    for offset, length in [(0, 10), (CHUNK - 3, 6), (CHUNK, 3 * CHUNK), (5 * CHUNK, 10**6)]:
        assert get(offset, length) == data[offset : offset + length]
    assert get(len(data), 5) == b""
    assert get(17, 0) == b""
    assert cache.stats()["corrupt_dropped"] == 0
    # A range touching chunk 4 finds it, drops the pack and fills it again through the loader.
    loader = Loader(pack)
    assert get(4 * CHUNK - 1, 2, loader) == data[4 * CHUNK - 1 : 4 * CHUNK + 1]
    assert (loader.calls, cache.stats()["corrupt_dropped"]) == (1, 1)
    assert get(0, len(data)) == data
    with pytest.raises(InvalidArgument, match="past the end"):
        get(len(data) + 1, 1)
    with pytest.raises(InvalidArgument, match="non-negative"):
        get(-1, 1)


def test_a_range_miss_fills_the_whole_pack(caches):
    cache = caches.open()
    pack = make_pack(5 * CHUNK, seed=1)
    loader = Loader(pack)
    got = cache.read_range(pack.digest, 2 * CHUNK + 5, 100, loader, name_for_errors=pack.name)
    assert got == pack.data[2 * CHUNK + 5 : 2 * CHUNK + 105]
    assert read(cache, pack, refuse) == pack.data
    with pytest.raises(InvalidArgument, match="past the end"):
        cache.read_range(
            make_pack(10, seed=9).digest, 11, 1, Loader(make_pack(10, seed=9)), name_for_errors="x"
        )


# -- restart ------------------------------------------------------------------------------------


def test_reopen_restores_contents_pins_and_insertion_order(caches):
    cache = caches.open(capacity=12 * CHUNK, policy="lru")
    a, b, c, d = (make_pack(4 * CHUNK, seed=i) for i in range(4))
    for pack in (a, b, c):
        read(cache, pack)
    cache.pin(b.digest)
    cache.close()

    cache = caches.open(capacity=12 * CHUNK, policy="lru")
    stats = cache.stats()
    assert (stats["entries"], stats["bytes"], stats["pinned"]) == (3, 12 * CHUNK, 1)
    for pack in (a, b, c):
        assert read(cache, pack, refuse) == pack.data
    read(cache, c, refuse)
    # LRU order now: a, c (b is pinned); d must push out a, the least recently used.
    read(cache, d)
    assert [cache.contains(p.digest) for p in (a, b, c, d)] == [False, True, True, True]


def test_reopen_with_a_smaller_capacity_evicts_the_oldest_unpinned(caches):
    cache = caches.open(capacity=16 * CHUNK, policy="lru")
    packs = [make_pack(4 * CHUNK, seed=i) for i in range(4)]
    for pack in packs:
        read(cache, pack)
    cache.pin(packs[3].digest)
    cache.close()
    cache = caches.open(capacity=8 * CHUNK, policy="lru")
    assert [cache.contains(p.digest) for p in packs] == [False, False, True, True]
    assert cache.stats()["dropped_on_open"] == 2
    cache.close()
    metas, _ = on_disk(caches.path)
    assert set(metas) == {entry_key(packs[2].digest), entry_key(packs[3].digest)}


def test_orphan_chunks_are_removed_on_open(caches):
    pack, stray = make_pack(2 * CHUNK, seed=1), make_pack(CHUNK, seed=2)
    read(caches.open(), pack)

    def add_orphans(txn: lmdb.Transaction, entries: object, chunks: object) -> None:
        txn.put(chunk_key(stray.digest, 0), stray.data, db=chunks)  # chunks, no meta
        txn.put(chunk_key(pack.digest, 7), b"beyond its last chunk", db=chunks)

    cache = caches.reopen_after(lambda: edit_on_disk(caches.path, add_orphans))
    assert cache.stats()["orphan_chunks_removed"] == 2
    assert read(cache, pack, refuse) == pack.data
    cache.close()
    _, chunks = on_disk(caches.path)
    assert sorted(chunks) == [chunk_key(pack.digest, 0), chunk_key(pack.digest, 1)]


def test_one_open_cache_per_directory(caches):
    caches.open()
    with pytest.raises(FailedPrecondition, match="already open"):
        caches.open()


def test_a_closed_cache_refuses_work(caches):
    cache = caches.open()
    cache.close()
    cache.close()
    pack = make_pack(10, seed=1)
    with pytest.raises(FailedPrecondition, match="closed"):
        read(cache, pack)


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgument, match="capacity"):
        PackCache(tmp_path / "cache", 0)
    with pytest.raises(InvalidArgument, match="unknown eviction policy"):
        PackCache(tmp_path / "cache", 1 << 20, "fifo-ish")
    with pytest.raises(InvalidArgument, match="chunk_bytes"):
        PackCache(tmp_path / "cache", 1 << 20, chunk_bytes=3)


# -- the LMDB map -------------------------------------------------------------------------------


def test_the_map_grows_when_full(caches):
    cache = caches.open(
        capacity=8 << 20, chunk_bytes=256 << 10, map_size=1 << 20, max_map_size=64 << 20
    )
    packs = [make_pack(1 << 20, seed=i) for i in range(4)]
    for pack in packs:
        assert read(cache, pack) == pack.data
    stats = cache.stats()
    assert stats["map_size"] > 1 << 20
    assert (stats["fills"], stats["fill_failures"]) == (4, 0)


def test_a_fill_that_cannot_be_stored_is_served_and_rolled_back(caches):
    cache = caches.open(
        capacity=8 << 20, chunk_bytes=256 << 10, map_size=1 << 20, max_map_size=2 << 20
    )
    small, big = make_pack(100 << 10, seed=1), make_pack(3 << 20, seed=2)
    read(cache, small)
    assert read(cache, big) == big.data
    stats = cache.stats()
    assert (stats["fills"], stats["fill_failures"]) == (1, 1)
    assert (stats["entries"], stats["bytes"]) == (1, len(small.data))
    assert not cache.contains(big.digest)
    assert read(cache, small, refuse) == small.data


# -- crash safety -------------------------------------------------------------------------------

# Fills the cache forever with packs of varied sizes (and pins, unpins, evictions), printing
# each fill's count, until it is killed.
_FILLER = """
import random, sys
from catalog.cache.pack_cache import PackCache
from catalog.digest import Digest
from catalog.errors import CatalogError

path, capacity, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cache = PackCache(path, capacity, "lru", chunk_bytes=16 << 10)
rng = random.Random(seed)
for count in range(10**9):
    data = rng.randbytes(rng.randint(1, 600 << 10))
    digest = Digest.of(data)
    cache.read_through(digest, lambda: data, name_for_errors=str(count))
    entries = list(cache.entries())
    if entries and rng.random() < 0.1:
        victim = rng.choice(entries).digest
        try:
            rng.choice([cache.pin, cache.unpin, cache.evict])(victim)
        except CatalogError:
            pass
    print(count, flush=True)
"""


def test_sigkill_during_fills_leaves_a_consistent_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    capacity = 3 << 20
    rng = random.Random(2026)
    total_fills = 0
    for round_ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", _FILLER, str(cache_dir), str(capacity), str(round_)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            kill_after = rng.randint(5, 60)
            for _ in range(kill_after):
                line = child.stdout.readline()  # type: ignore[union-attr]
                assert line, f"the filler died early: {child.stderr.read()}"  # type: ignore[union-attr]
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
        total_fills += kill_after

        with PackCache(cache_dir, capacity, "lru", chunk_bytes=16 << 10) as cache:
            stats = cache.stats()
            # One transaction per fill: the kill can leave nothing half written.
            assert (stats["orphan_chunks_removed"], stats["dropped_on_open"]) == (0, 0)
            assert 0 < stats["bytes"] <= capacity
            entries = list(cache.entries())
            assert len(entries) == stats["entries"]
            for entry in entries:
                data = cache.read_through(entry.digest, refuse, name_for_errors="after kill")
                assert len(data) == entry.size
            assert cache.verify().corrupt == ()
            assert cache.stats()["corrupt_dropped"] == 0
            # And it is still a working cache.
            pack = make_pack(50 << 10, seed=round_)
            assert read(cache, pack) == pack.data
    assert total_fills >= 25


def test_packs_keep_the_chunk_size_they_were_written_with(caches):
    old, new = make_pack(5 * CHUNK, seed=1), make_pack(5 * CHUNK, seed=2)
    read(caches.open(chunk_bytes=CHUNK), old)
    caches.close_all()
    cache = caches.open(chunk_bytes=4 * CHUNK)
    read(cache, new)
    assert read(cache, old, refuse) == old.data
    got = cache.read_range(old.digest, CHUNK - 1, 2 * CHUNK, refuse, name_for_errors=old.name)
    assert got == old.data[CHUNK - 1 : 3 * CHUNK - 1]
    cache.close()
    _, chunks = on_disk(caches.path)
    assert sum(key.startswith(entry_key(old.digest)) for key in chunks) == 5
    assert sum(key.startswith(entry_key(new.digest)) for key in chunks) == 2
