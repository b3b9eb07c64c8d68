"""An in-process store: a dict behind a lock. For tests and the embedded demo."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from catalog.storage.base import BlobStore
from catalog.storage.keys import check_key, check_prefix, check_range


class MemoryStore(BlobStore):
    """Keys and bytes in a dict; every operation is atomic under one lock.

    Objects are copied in on ``put`` and handed out as immutable ``bytes``, so callers can
    neither see nor cause partial writes.
    """

    supports_conditional_put = True
    supports_ranges = True

    def __init__(self) -> None:
        self.url = "memory://"
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            return self._objects.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        check_key(key)
        check_range(key, start, length)
        with self._lock:
            data = self._objects.get(key)
        return None if data is None else data[start : start + length]

    def put(self, key: str, data: bytes | memoryview, *, if_absent: bool = False) -> bool:
        check_key(key)
        blob = bytes(data)
        with self._lock:
            if if_absent and key in self._objects:
                return False
            self._objects[key] = blob
            return True

    def size(self, key: str) -> int | None:
        check_key(key)
        with self._lock:
            data = self._objects.get(key)
        return None if data is None else len(data)

    def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        with self._lock:
            keys = sorted(k for k in self._objects if k.startswith(prefix))
        return iter(keys)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        wanted = [check_key(key) for key in keys]
        with self._lock:
            return {key: self._objects.get(key) for key in wanted}
