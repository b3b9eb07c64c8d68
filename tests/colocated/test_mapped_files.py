"""Store files kept mapped between colocated reads: reused only for the same file, every chunk
still checked on every read, bounded, and never unmapped under a reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.client.mapped_files import MappedFiles
from catalog.errors import DataLoss
from tests.colocated.conftest import Served, big_pack
from tests.colocated.test_colocated_reads import blob_file


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name and rename it into place (a new file)."""
    temp = path.with_suffix(".tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def test_a_kept_map_serves_only_the_file_it_maps(tmp_path: Path) -> None:
    files = MappedFiles()
    path = tmp_path / "a"
    _write(path, b"one" * 100)
    first = files.view(str(path))
    assert files.view(str(path)) is first
    assert files.counters == {"hits": 1, "maps": 1}
    _write(path, b"two" * 100)  # replaced: another inode under the same path
    second = files.view(str(path))
    assert bytes(second) == b"two" * 100
    assert bytes(first) == b"one" * 100  # the old map is intact for whoever still reads it
    files.drop(str(path))
    assert files.view(str(path)) is not second
    path.unlink()
    with pytest.raises(OSError):
        files.view(str(path))


def test_kept_maps_are_bounded_and_dropped_when_their_file_is_gone(tmp_path: Path) -> None:
    files = MappedFiles(max_files=2, max_bytes=250)
    paths = [tmp_path / f"f{i}" for i in range(4)]
    for p in paths:
        _write(p, bytes(100))
    views = [files.view(str(p)) for p in paths[:2]]
    assert len(files) == 2
    files.view(str(paths[2]))  # the least recently used (f0) goes
    assert len(files) == 2
    files.view(str(paths[1]))
    assert files.counters["hits"] == 1
    paths[1].unlink()
    files.view(str(paths[3]))  # a miss drops the map whose file is gone
    assert len(files) == 2 and files.counters["maps"] == 4
    assert all(bytes(v) == bytes(100) for v in views)  # dropped maps still read
    files.clear()
    assert len(files) == 0


def test_a_byte_flipped_under_a_kept_map_is_still_refused(served: Served) -> None:
    """The kept map is the same file, modification time put back: only the checksums, made
    on every read, can see the flip."""
    pack = big_pack(3, seed=31)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/kept", pack).revision
        assert bytes(client.fetch_checked(revision)[0]) == pack
        assert bytes(client.fetch_checked(revision)[0]) == pack
        assert client.colocated is not None
        reader = client.colocated._reader
        assert reader is not None and reader.mapped.counters["hits"] >= 1
        blob = blob_file(served, revision.digest)
        status = blob.stat()
        with open(blob, "r+b") as f:
            f.seek((1 << 20) + 77)
            f.write(bytes([pack[(1 << 20) + 77] ^ 0xFF]))
        os.utime(blob, ns=(status.st_atime_ns, status.st_mtime_ns))
        with pytest.raises(DataLoss):
            client.fetch_checked(revision)
        assert client.colocated.counters["corrupt_reported"] >= 1
