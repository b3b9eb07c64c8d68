from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.errors import InvalidArgument, Unavailable
from catalog.storage import BlobStore, open_store
from catalog.storage.local import TEMP_PREFIX, LocalDirStore
from tests.storage.contract import BlobStoreContract


class TestLocalDirStore(BlobStoreContract):
    @pytest.fixture
    def store(self, file_store_url: str) -> Iterator[BlobStore]:
        with open_store(file_store_url) as store:
            assert isinstance(store, LocalDirStore)
            yield store


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "s")
    store.put("a/b", b"1")
    store.put("a/b", b"2")
    store.put("a/b", b"3", if_absent=True)
    assert sorted(p.name for p in (tmp_path / "s" / "a").iterdir()) == ["b"]


def test_stray_temporary_files_are_not_listed(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "s")
    store.put("a/b", b"1")
    (tmp_path / "s" / "a" / f"{TEMP_PREFIX}crashed").write_bytes(b"half")
    assert list(store.list()) == ["a/b"]
    with pytest.raises(InvalidArgument):
        store.put(f"a/{TEMP_PREFIX}x", b"")


def test_a_key_cannot_be_object_and_prefix(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "s")
    store.put("a/b", b"1")
    with pytest.raises(InvalidArgument, match="prefix of other keys"):
        store.put("a", b"2")
    with pytest.raises(InvalidArgument, match="parent path is an object"):
        store.put("a/b/c", b"3")
    assert store.get("a") is None
    assert store.get("a/b/c") is None
    assert list(store.list()) == ["a/b"]


def test_without_fsync_it_still_works(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"), fsync=False)
    assert store.put("k", b"v", if_absent=True)
    assert store.get("k") == b"v"


def test_unwritable_root_is_unavailable() -> None:
    # /proc refuses new files even to root, unlike a chmod-ed directory.
    store = LocalDirStore("/proc/self/fdinfo")
    with pytest.raises(Unavailable, match="cannot write 'k'"):
        store.put("k", b"v")
    with pytest.raises(Unavailable, match="cannot create"):
        LocalDirStore("/proc/loracat-nonexistent/store")


def test_root_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(Unavailable, match="not a directory"):
        LocalDirStore(tmp_path / "f")
    with pytest.raises(Unavailable):
        LocalDirStore(tmp_path / "missing", create=False)
