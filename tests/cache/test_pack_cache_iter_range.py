"""PackCache.iter_range, the streamed read FetchPack serves from: pieces in order, each chunk
checked as it is read, damage and eviction midway falling back to the loader, on real LMDB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.errors import InvalidArgument
from tests.cache.test_pack_cache import (
    CHUNK,
    CacheDir,
    Loader,
    flip_byte,
    make_pack,
    read,
    refuse,
)


@pytest.fixture
def caches(tmp_path: Path) -> Iterator[CacheDir]:
    directory = CacheDir(tmp_path / "cache")
    yield directory
    directory.close_all()


def pieces(cache, pack, offset, length, loader=refuse, piece_bytes=CHUNK):
    return list(
        cache.iter_range(
            pack.digest, offset, length, loader, name_for_errors=pack.name, piece_bytes=piece_bytes
        )
    )


def test_a_hit_streams_checked_pieces_that_never_span_two_chunks(caches: CacheDir):
    pack = make_pack(6 * CHUNK + 300, seed=1)
    cache = caches.open()
    read(cache, pack)
    data = pack.data
    cases = [
        (0, len(data), CHUNK),
        (0, 10**9, 400),
        (CHUNK - 3, 6, CHUNK),
        (5, 3 * CHUNK, 5000),
        (6 * CHUNK, 10**6, 64),
    ]
    for offset, length, piece_bytes in cases:
        got = pieces(cache, pack, offset, length, piece_bytes=piece_bytes)
        assert b"".join(got) == data[offset : offset + length]
        assert all(0 < len(p) <= min(piece_bytes, CHUNK) for p in got)
        ends = [offset + sum(len(p) for p in got[: i + 1]) for i in range(len(got))]
        # Every piece ends at the range's end, a chunk boundary or a whole piece_bytes in.
        assert all(
            e == offset + min(length, len(data) - offset)
            or e % CHUNK == 0
            or (len(p) == piece_bytes)
            for e, p in zip(ends, got, strict=True)
        )
    assert pieces(cache, pack, len(data), 5) == []
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (len(cases) + 1, 1)  # the fill was the miss


def test_a_miss_loads_fills_and_streams_from_the_loaded_bytes(caches: CacheDir):
    pack = make_pack(5 * CHUNK, seed=2)
    cache = caches.open()
    loader = Loader(pack)
    got = pieces(cache, pack, CHUNK + 7, 3 * CHUNK, loader, piece_bytes=700)
    assert b"".join(got) == pack.data[CHUNK + 7 : 4 * CHUNK + 7]
    assert all(len(p) <= 700 for p in got)
    assert loader.calls == 1 and cache.contains(pack.digest)
    assert b"".join(pieces(cache, pack, 0, len(pack.data))) == pack.data  # now a hit


def test_a_corrupt_chunk_met_midway_is_dropped_and_the_rest_comes_from_the_loader(
    caches: CacheDir,
):
    pack = make_pack(6 * CHUNK, seed=3)
    read(caches.open(), pack)
    cache = caches.reopen_after(lambda: flip_byte(caches.path, pack.digest, 4))
    loader = Loader(pack)
    stream = cache.iter_range(pack.digest, 0, len(pack.data), loader, name_for_errors=pack.name)
    first = [next(stream) for _ in range(4)]  # chunks 0-3 are good and come from the cache
    assert loader.calls == 0
    rest = list(stream)
    assert b"".join(first + rest) == pack.data
    stats = cache.stats()
    assert (loader.calls, stats["corrupt_dropped"], stats["hits"]) == (1, 1, 1)
    assert stats["bytes_read"] == 4 * CHUNK
    assert b"".join(pieces(cache, pack, 0, len(pack.data))) == pack.data  # refilled, good


def test_an_entry_evicted_midway_finishes_from_the_loader(caches: CacheDir):
    pack = make_pack(4 * CHUNK, seed=4)
    cache = caches.open()
    read(cache, pack)
    loader = Loader(pack)
    stream = cache.iter_range(pack.digest, 0, len(pack.data), loader, name_for_errors=pack.name)
    head = next(stream)
    cache.evict(pack.digest)
    assert head + b"".join(stream) == pack.data
    assert loader.calls == 1 and cache.stats()["corrupt_dropped"] == 0


def test_a_pin_midway_does_not_count_as_a_new_entry(caches: CacheDir):
    pack = make_pack(3 * CHUNK, seed=5)
    cache = caches.open()
    read(cache, pack)
    stream = cache.iter_range(pack.digest, 0, len(pack.data), refuse, name_for_errors=pack.name)
    head = next(stream)
    cache.pin(pack.digest)  # rewrites the meta: the chunks are the same
    assert head + b"".join(stream) == pack.data


def test_bad_arguments_are_refused_when_called_and_past_the_end_while_iterating(
    caches: CacheDir,
):
    pack = make_pack(2 * CHUNK, seed=6)
    cache = caches.open()
    read(cache, pack)
    with pytest.raises(InvalidArgument, match="non-negative"):
        cache.iter_range(pack.digest, -1, 5, refuse, name_for_errors=pack.name)
    with pytest.raises(InvalidArgument, match="piece_bytes"):
        cache.iter_range(pack.digest, 0, 5, refuse, name_for_errors=pack.name, piece_bytes=0)
    stream = cache.iter_range(pack.digest, len(pack.data) + 1, 5, refuse, name_for_errors="x")
    with pytest.raises(InvalidArgument, match="past the end"):
        next(stream)
