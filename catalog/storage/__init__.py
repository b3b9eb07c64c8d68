"""Durable-tier backends behind one small ABC, opened by URL through one scheme registry.

>>> store = open_store("memory://")
>>> store = open_store("file:///var/lib/loracat")      # or a plain path
>>> store = open_store("s3://bucket/prefix", create_bucket=True)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from catalog.errors import InvalidArgument
from catalog.storage.base import BlobStore

#: A loader turns the part of a URL after ``scheme://`` (plus keyword options) into a store.
StoreLoader = Callable[..., BlobStore]


def _load_memory(location: str, **options: Any) -> BlobStore:
    from catalog.storage.memory import MemoryStore

    if location or options:
        raise InvalidArgument(
            f"memory:// takes no location or options (got {location!r}, {sorted(options)})"
        )
    return MemoryStore()


def _load_file(location: str, **options: Any) -> BlobStore:
    from catalog.storage.local import LocalDirStore

    # file:///abs/path arrives as "/abs/path"; file://localhost/abs/path names the same place.
    host, slash, path = location.partition("/")
    if host not in ("", "localhost"):
        raise InvalidArgument(f"file:// URLs must name a local absolute path, got host {host!r}")
    return LocalDirStore(unquote(slash + path), **options)


def _load_s3(location: str, **options: Any) -> BlobStore:
    from catalog.storage.fsspec_store import FsspecStore

    bucket, _, prefix = location.partition("/")
    return FsspecStore(bucket, prefix, **options)


STORE_LOADERS: dict[str, StoreLoader] = {
    "memory": _load_memory,
    "file": _load_file,
    "s3": _load_s3,
}


def open_store(url: str, **options: Any) -> BlobStore:
    """Open the store a URL names: ``memory://``, ``file:///path`` (or a plain path),
    ``s3://bucket/prefix``.

    ``options`` go to the backend's constructor (e.g. ``create_bucket=True`` for S3,
    ``fsync=False`` for a local directory).

    Raises:
        InvalidArgument: unknown scheme, malformed URL or unknown option.
        Unavailable: the backend cannot be reached or opened.
    """
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"store URL must be a non-empty string, got {url!r}")
    if "://" not in url:  # a plain path, relative to the working directory or absolute
        url = Path(url).expanduser().absolute().as_uri()
    scheme, _, location = url.partition("://")
    loader = STORE_LOADERS.get(scheme.lower())
    if loader is None:
        raise InvalidArgument(
            f"unknown store URL scheme {scheme!r} in {url!r}; known: {', '.join(STORE_LOADERS)}"
        )
    if scheme != "file" and urlsplit(url).query:
        raise InvalidArgument(f"store URLs take options as arguments, not a query: {url!r}")
    try:
        return loader(location, **options)
    except TypeError as exc:  # an option the backend does not take
        raise InvalidArgument(f"bad options for {scheme}:// store: {exc}") from exc


__all__ = ["STORE_LOADERS", "BlobStore", "StoreLoader", "open_store"]
