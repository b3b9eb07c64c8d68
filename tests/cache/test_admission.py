"""Admission of a just-pushed pack to the NVMe tier (``catalog.cache.admission``): cached as a
fill would be, counted apart from requests, under the policy's budget, and through the single
flight so that a reader racing it waits instead of loading."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from catalog.cache.pack_cache import PackCache
from catalog.digest import Digest
from catalog.errors import FailedPrecondition

MIB = 1 << 20


def pack_bytes(n: int, seed: int) -> tuple[Digest, bytes]:
    data = bytes((seed * 7 + i) % 251 for i in range(256)) * (n // 256)
    return Digest.of(data, "sha256"), data


def never_load() -> bytes:
    raise AssertionError("the loader ran: the admitted pack should have been read")


def test_an_admitted_pack_is_a_hit_counted_apart_from_requests(tmp_path: Path) -> None:
    digest, data = pack_bytes(3 * MIB, 1)
    with PackCache(tmp_path / "c", 16 * MIB, "lru", values_finite=lambda _: False) as cache:
        assert cache.admit_verified(
            digest, memoryview(data), values_finite=True, name_for_errors="a"
        )
        stats = cache.stats()
        assert (stats["admitted_at_push"], stats["fills"], stats["hits"], stats["misses"]) == (
            1,
            1,
            0,
            0,
        )
        assert cache.read_through(digest, never_load, name_for_errors="a") == data
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["loads"]) == (1, 0, 0)
        # Already cached: a second admission changes nothing.
        assert not cache.admit_verified(digest, data, values_finite=True, name_for_errors="a")
        assert cache.stats()["admitted_at_push"] == 1


def test_the_finite_flag_is_the_callers_not_asked_again(tmp_path: Path) -> None:
    digest, data = pack_bytes(MIB, 2)
    asked: list[int] = []

    def finite(_: bytes) -> bool:
        asked.append(1)
        return False

    with PackCache(tmp_path / "c", 16 * MIB, "lru", values_finite=finite) as cache:
        cache.admit_verified(digest, data, values_finite=True, name_for_errors="a")
        meta = cache._read_meta(digest, "a")
    assert meta is not None and meta.values_finite and not asked


def test_a_pack_on_the_tiers_filesystem_is_admitted_as_a_reference(tmp_path: Path) -> None:
    digest, data = pack_bytes(2 * MIB, 3)
    stored = tmp_path / "store" / "blob"
    stored.parent.mkdir()
    stored.write_bytes(data)
    with PackCache(tmp_path / "c", 16 * MIB, "lru", local_files=lambda d: stored) as cache:
        assert cache.admit_verified(digest, data, values_finite=True, name_for_errors="a")
        assert cache.stats()["referenced_fills"] == 1
        assert cache.stats()["file_bytes"] < MIB  # the meta and checksums, not the pack
        assert cache.read_through(digest, never_load, name_for_errors="a") == data


def test_admission_respects_the_budget(tmp_path: Path) -> None:
    (d1, p1), (d2, p2), (big, huge) = (pack_bytes(4 * MIB, s) for s in (4, 5, 6))
    with PackCache(tmp_path / "c", 6 * MIB, "lru") as cache:
        assert cache.admit_verified(d1, p1, values_finite=True, name_for_errors="one")
        assert cache.admit_verified(d2, p2, values_finite=True, name_for_errors="two")
        assert not cache.contains(d1) and cache.contains(d2)  # the older one was evicted
        assert cache.stats()["evictions"] == 1
        assert not cache.admit_verified(big, huge * 2, values_finite=True, name_for_errors="big")
        assert cache.stats()["not_admitted"] == 1 and cache.contains(d2)


def test_a_reader_racing_the_admission_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, data = pack_bytes(2 * MIB, 7)
    with PackCache(tmp_path / "c", 16 * MIB, "lru") as cache:
        installing, go_on = threading.Event(), threading.Event()
        install = cache._install

        def slow_install(*args: Any) -> None:
            installing.set()
            assert go_on.wait(10)
            install(*args)

        monkeypatch.setattr(cache, "_install", slow_install)
        admitter = threading.Thread(
            target=cache.admit_verified,
            args=(digest, data),
            kwargs={"values_finite": True, "name_for_errors": "a"},
        )
        admitter.start()
        assert installing.wait(10)
        got: list[bytes] = []
        reader = threading.Thread(
            target=lambda: got.append(cache.read_through(digest, never_load, name_for_errors="a"))
        )
        reader.start()
        time.sleep(0.2)  # the reader is waiting on the admission's flight
        assert reader.is_alive()
        go_on.set()
        admitter.join(10)
        reader.join(10)
        assert got == [data]
        stats = cache.stats()
        # The reader waited (a coalesced miss), then read the admitted entry (a hit).
        assert (stats["loads"], stats["coalesced"], stats["hits"]) == (0, 1, 1)


def test_a_closed_cache_refuses(tmp_path: Path) -> None:
    digest, data = pack_bytes(MIB, 8)
    cache = PackCache(tmp_path / "c", 16 * MIB, "lru")
    cache.close()
    with pytest.raises(FailedPrecondition):
        cache.admit_verified(digest, data, values_finite=True, name_for_errors="a")


def test_checksums_the_caller_took_are_used_when_the_chunk_size_is_the_caches(
    tmp_path: Path,
) -> None:
    from catalog.cache.layout import checksum

    digest, data = pack_bytes(3 * MIB, 9)
    other, more = pack_bytes(2 * MIB, 10)
    with PackCache(tmp_path / "c", 16 * MIB, "lru", chunk_bytes=MIB) as cache:
        sums = b"".join(checksum(data[i : i + MIB]) for i in range(0, len(data), MIB))
        assert cache.admit_verified(
            digest, data, values_finite=True, name_for_errors="a", checksums=(MIB, sums)
        )
        assert cache._read_meta(digest, "a").checksums == sums  # type: ignore[union-attr]
        # Taken with another chunk size: not this cache's, so it takes its own.
        assert cache.admit_verified(
            other, more, values_finite=True, name_for_errors="b", checksums=(2 * MIB, b"x" * 16)
        )
        for key, value in ((digest, data), (other, more)):
            assert cache.read_through(key, never_load, name_for_errors="r") == value
        assert cache.stats()["corrupt_dropped"] == 0
