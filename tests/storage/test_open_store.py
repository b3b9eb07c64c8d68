"""``open_store``: one registry from URL scheme to backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog.errors import InvalidArgument
from catalog.storage import STORE_LOADERS, open_store
from catalog.storage.local import LocalDirStore
from catalog.storage.memory import MemoryStore


def test_the_registry_names_every_scheme() -> None:
    assert set(STORE_LOADERS) == {"memory", "file", "s3"}


def test_memory_urls_open_fresh_stores() -> None:
    first, second = open_store("memory://"), open_store("memory://")
    assert isinstance(first, MemoryStore)
    first.put("k", b"v")
    assert second.get("k") is None
    assert first.url == "memory://"


@pytest.mark.parametrize(
    "spelling",
    [
        lambda root: root.as_uri(),
        lambda root: "file://localhost" + str(root),
        lambda root: str(root),
        lambda root: "FILE://" + str(root),
    ],
)
def test_file_urls_and_plain_paths(tmp_path: Path, spelling) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "with space" / "store"
    store = open_store(spelling(root))
    assert isinstance(store, LocalDirStore)
    assert store.root == root
    assert store.url == root.as_uri()
    assert open_store(store.url).root == root  # type: ignore[attr-defined]


def test_relative_paths_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("relative/store")
    assert isinstance(store, LocalDirStore)
    assert store.root == tmp_path / "relative" / "store"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("gcs://bucket/x", "unknown store URL scheme 'gcs'"),
        ("", "non-empty"),
        ("memory://somewhere", "memory:// takes no location"),
        ("file://otherhost/x", "host 'otherhost'"),
        ("s3://bucket/x?endpoint=y", "not a query"),
    ],
)
def test_bad_urls_are_invalid(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        open_store(url)


def test_unknown_options_are_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="bad options for file:// store"):
        open_store(tmp_path.as_uri(), colour="blue")
    with pytest.raises(InvalidArgument, match="memory:// takes no location or options"):
        open_store("memory://", fsync=False)
