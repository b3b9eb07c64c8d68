"""The colocated reader against a writer in another process that grows its LMDB map after the
reader opened the environment (LMDB answers the reader ``MDB_MAP_RESIZED``)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

from catalog.cache.layout import host_id
from catalog.cache.pack_cache import PackCache
from catalog.client.colocated import CacheLocation, open_reader
from catalog.digest import Digest

MIB = 1 << 20


def writer(path: str, requests: Any, answers: Any) -> None:
    """Fill packs on request into a cache whose map starts at 4 MiB (it doubles when full)."""
    cache = PackCache(path, capacity_bytes=64 * MIB, map_size=4 * MIB, max_map_size=256 * MIB)
    answers.put(cache.instance_id)
    while (size := requests.get()) is not None:
        data = os.urandom(size)
        digest = Digest.of(data)
        cache.read_through(digest, lambda d=data: d, name_for_errors="fill")
        answers.put((str(digest), data, cache.stats()["map_size"]))
    cache.close()


def test_the_reader_follows_a_map_the_catalog_grew(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    requests, answers = context.Queue(), context.Queue()
    process = context.Process(target=writer, args=(str(tmp_path / "cache"), requests, answers))
    process.start()
    try:
        instance = answers.get(timeout=60)
        requests.put(1 * MIB)
        small, small_data, first_map = answers.get(timeout=60)
        reader = open_reader(CacheLocation(str(tmp_path / "cache"), instance, host_id(), 0))
        try:
            assert bytes(reader.read(Digest.parse(small), MIB, "small")) == small_data
            mapped_before = reader._shared.env.info()["map_size"]
            requests.put(24 * MIB)  # past the 4 MiB map: the writer grows it
            big, big_data, grown_map = answers.get(timeout=60)
            assert grown_map > first_map
            assert bytes(reader.read(Digest.parse(big), 24 * MIB, "big")) == big_data
            assert reader._shared.env.info()["map_size"] > mapped_before  # it adopted the map
            assert bytes(reader.read(Digest.parse(small), MIB, "small")) == small_data
        finally:
            reader.close()
    finally:
        requests.put(None)
        process.join(timeout=60)
    assert process.exitcode == 0
