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


def test_a_consumed_file_is_linked_in_not_copied(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "s")
    source = tmp_path / "spool.bin"
    source.write_bytes(b"pack bytes")
    source.chmod(0o600)  # a spool file is private
    assert store.put_file("blobs/x", source, if_absent=True, consume=True) is True
    stored = tmp_path / "s" / "blobs" / "x"
    assert stored.stat().st_ino == source.stat().st_ino  # the same file: no copy
    assert stored.stat().st_mode & 0o777 == (tmp_path / "s").stat().st_mode & 0o666
    source.unlink()  # what the caller does with a consumed file
    assert store.get("blobs/x") == b"pack bytes"
    other = tmp_path / "other.bin"
    other.write_bytes(b"other")
    assert store.put_file("blobs/x", other, if_absent=True, consume=True) is False
    assert store.get("blobs/x") == b"pack bytes"
    assert store.put_file("blobs/x", other, consume=True) is True  # overwrite
    assert store.get("blobs/x") == b"other"
    assert sorted(p.name for p in (tmp_path / "s" / "blobs").iterdir()) == ["x"]
    with pytest.raises(InvalidArgument):
        store.put_file("blobs/y", tmp_path / "absent", consume=True)


def test_a_consumed_file_that_cannot_be_linked_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    store = LocalDirStore(tmp_path / "s")
    source = tmp_path / "spool.bin"
    source.write_bytes(b"pack bytes")

    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    # (if_absent publishes a copy by os.link too, so without links only an overwrite works)
    assert store.put_file("blobs/x", source, consume=True) is True
    monkeypatch.undo()
    assert store.get("blobs/x") == b"pack bytes"
    assert (tmp_path / "s" / "blobs" / "x").stat().st_ino != source.stat().st_ino
