"""Read-only maps of the durable store's pack files, kept open between colocated reads.

A colocated read of a reference entry (a ``file://`` store on the NVMe tier's filesystem, see
``catalog.cache.layout``) maps the store's immutable file and checks every chunk on the map.
Mapping the file afresh for every read costs the page-table work of the whole file again: the
checksum pass faults in every page of the new map (~0.1-0.3 ms of a 16.8 MB pack's ~0.4-0.9
ms read on the 2-core dev machine). Keeping the map makes a repeated read of the same pack
(an adapter attached again after its staging left the engine's host tier) touch only mapped
pages. Every read still checks every chunk against the tier's checksums: what is kept is the
mapping, never a verdict.

A kept map is reused only while the path still names the same file (device, inode, size and
modification time, one ``stat`` per read); a file replaced or gone is mapped again (or the
read fails as before). A map is dropped when its read fails a check, and the least recently
used ones beyond ``max_files`` or ``max_bytes`` are dropped; dropping never unmaps under a
reader: a map closes when the last view into it (an engine's staged tensors) is gone. A kept
map of a file the catalog has since deleted (GC of a revision) holds that file's disk space
until it is dropped, so the bounds are small and each miss also drops kept maps whose path no
longer names their file.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["MappedFiles"]

#: Files kept mapped per process, and their total size: a few hot adapters' packs.
DEFAULT_MAX_FILES = 32
DEFAULT_MAX_BYTES = 2 << 30


@dataclass(frozen=True, slots=True)
class _Kept:
    identity: tuple[int, int, int, int]
    view: memoryview


def _identity(status: os.stat_result) -> tuple[int, int, int, int]:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


class MappedFiles:
    """Read-only maps by path (see the module docstring). Thread safe."""

    def __init__(
        self, max_files: int = DEFAULT_MAX_FILES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        #: Reads served from a kept map, and files mapped afresh.
        self.counters = {"hits": 0, "maps": 0}

    def view(self, path: str) -> memoryview:
        """The whole file at ``path``, mapped read-only (a kept map when ``path`` still names
        the file it maps).

        Raises:
            OSError: the file cannot be opened or mapped.
            ValueError: the file is empty (an empty file cannot be mapped).
        """
        identity = _identity(os.stat(path))
        with self._lock:
            kept = self._kept.get(path)
            if kept is not None and kept.identity == identity:
                self._kept.move_to_end(path)
                self.counters["hits"] += 1
                return kept.view
        with open(path, "rb") as f:
            opened = _identity(os.fstat(f.fileno()))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped).toreadonly()
        with self._lock:
            self.counters["maps"] += 1
            self._kept[path] = _Kept(opened, view)
            self._kept.move_to_end(path)
            self._trim()
        return view

    def drop(self, path: str) -> None:
        """Forget the map of ``path`` (its read failed a check: map the file afresh next)."""
        with self._lock:
            self._kept.pop(path, None)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)

    def _trim(self) -> None:
        """Drop maps whose path names another file or none, then the least recently used
        beyond the bounds (lock held)."""
        for path, kept in list(self._kept.items()):
            try:
                same = _identity(os.stat(path)) == kept.identity
            except OSError:
                same = False
            if not same:
                del self._kept[path]
        total = sum(k.view.nbytes for k in self._kept.values())
        while self._kept and (len(self._kept) > self.max_files or total > self.max_bytes):
            _, oldest = self._kept.popitem(last=False)
            total -= oldest.view.nbytes
