"""The state the parts of the pack cache share, and the calls they make on each other.

:class:`~catalog.cache.pack_cache.PackCache` is put together from parts, one module each:
reads (:mod:`catalog.cache.reads`), the miss path and fills (:mod:`catalog.cache.fills`),
pins, holds and eviction (:mod:`catalog.cache.pins`), corrupt-copy repair
(:mod:`catalog.cache.repair`) and admission at push (:mod:`catalog.cache.admission`).
:class:`PackCacheState` is their common base: it declares what ``PackCache.__init__`` sets up
and, for the type checker only, the methods one part calls on another, so that each part
reads on its own and all of them agree on one set of names.

Locking (all parts follow it). ``_lock`` guards the in-memory state (policy, pins, holds,
counters, single-flight table) and is held only for bookkeeping, never across LMDB I/O,
hashing or a loader call. ``_write_lock`` serialises the writers (LMDB allows one write
transaction at a time anyway) so that the policy and the environment change in the same order;
hits never take it. Transactions go through :class:`~catalog.cache.environment.CacheEnvironment`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from catalog.cache.chunk_reads import CorruptEntry
from catalog.cache.environment import CacheEnvironment
from catalog.cache.layout import EntryMeta
from catalog.cache.policies import EvictionPolicy
from catalog.digest import Digest

if TYPE_CHECKING:
    from catalog.cache.pack_cache import CacheEntry

__all__ = ["CacheCounters", "Loader", "PackCacheState"]

#: A loader returns the pack's bytes, already verified against its digest, or raises.
Loader = Callable[[], bytes]

T = TypeVar("T")


@dataclass
class CacheCounters:
    """What :meth:`~catalog.cache.pack_cache.PackCache.stats` reports as counted since open."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0  # misses that waited for another caller's load instead of loading
    loads: int = 0
    fills: int = 0
    not_admitted: int = 0
    fill_failures: int = 0
    evictions: int = 0
    evicted_on_request: int = 0
    bytes_read: int = 0
    bytes_filled: int = 0
    corrupt_dropped: int = 0
    read_errors: int = 0
    orphan_chunks_removed: int = 0
    referenced_fills: int = 0  # fills cached as references to the durable tier's file
    admitted_at_push: int = 0  # fills by the push that committed the pack (catalog.cache.admission)
    dropped_on_open: int = 0


class PackCacheState:
    """The common base of the pack cache's parts (see the module doc); not used on its own."""

    path: Path
    #: Bytes per stored chunk for packs written from now on.
    chunk_bytes: int
    _env: CacheEnvironment
    _policy: EvictionPolicy
    _lock: threading.Lock
    _write_lock: threading.Lock
    _counters: CacheCounters
    _pins: dict[str, int]  # pin counts of resident entries (also in their meta)
    _pending_pins: dict[str, int]  # pins to apply when the key is next filled
    _holds: dict[str, int]  # in-memory pins of readers in other processes
    _inflight: dict[str, Future[bytes]]  # the single-flight table of loads and admissions
    _local_files: Callable[[Digest], Path | None] | None
    _values_finite: Callable[[bytes], bool] | None

    def _check_open(self) -> None:
        self._env.check_open()

    def _set_pin_count(self, key: str, count: int) -> None:
        """Record ``key``'s pin count in memory (the caller holds ``_lock``)."""
        if count:
            self._pins[key] = count
        else:
            self._pins.pop(key, None)

    if TYPE_CHECKING:
        # Defined by the parts named in the module doc; declared here for the others' calls.

        # catalog.cache.reads
        def read_through(
            self, digest: Digest, loader: Loader, *, name_for_errors: str
        ) -> bytes: ...
        def _read_whole(self, digest: Digest, name: str) -> bytes | None: ...

        # catalog.cache.fills
        def _load(
            self, digest: Digest, loader: Loader, name: str, *, recheck: bool
        ) -> bytes | None: ...
        def _install(self, digest: Digest, data: bytes, meta: EntryMeta) -> None: ...
        def _reference_for(self, digest: Digest, data: bytes) -> str: ...

        # catalog.cache.repair
        def _cached(
            self, digest: Digest, read: Callable[[Digest, str], T | None], name: str
        ) -> T | None: ...
        def _drop_corrupt(self, digest: Digest, corrupt: CorruptEntry, name: str) -> bool: ...

        # catalog.cache.pack_cache
        def entries(self) -> Iterator[CacheEntry]: ...
