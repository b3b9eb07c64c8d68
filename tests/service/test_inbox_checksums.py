"""The NVMe tier's chunk checksums of an inbox push: taken on the calling thread
(``HashAndSync.take_checksums``) beside the hashing thread, they are the checksums of the
file's bytes, chunk by chunk, and the tier records exactly them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from catalog.cache.layout import checksum
from catalog.client import CatalogClient
from catalog.local_push import HashAndSync
from tests.servers import RunningCatalog


def _sums(data: bytes, size: int) -> bytes:
    return b"".join(checksum(data[i : i + size]) for i in range(0, len(data), size))


def test_hash_and_sync_gives_the_files_digest_and_chunk_checksums(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 17)  # a short last chunk
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        pending = HashAndSync(fd, "sha256", 4096)
        pending.take_checksums()
        assert pending.digest().hex == hashlib.sha256(data).hexdigest()
        assert pending.checksums == (4096, _sums(data, 4096))
        without = HashAndSync(fd, "sha256")
        without.take_checksums()  # no chunk size: nothing to take
        assert without.digest().hex == hashlib.sha256(data).hexdigest()
        assert without.checksums is None
    finally:
        os.close(fd)


def test_an_inbox_push_admits_the_checksums_of_its_bytes(served: RunningCatalog, packs):  # type: ignore[no-untyped-def]
    pack = max(packs.values(), key=len)
    with CatalogClient(served.address) as client:
        pushed = client.push("acme/sums", pack)
        assert pushed.created and client._inbox is not None
        assert client._inbox.counters["pushes"] == 1
    cache = served.catalog.pack_cache
    assert cache is not None
    assert served.catalog.stats()["counters"]["nvme_admitted_at_push"] == 1
    meta = cache._read_meta(pushed.revision.digest, "acme/sums")
    assert meta is not None
    assert meta.checksums == _sums(pack, meta.chunk_bytes)
