"""What the pack cache does with a cached copy that fails a check: drop it, read on as a miss.

Every read goes through :meth:`RepairMixin._cached`, which turns a copy that fails
verification (:class:`~catalog.cache.chunk_reads.CorruptEntry`) into a drop and an LMDB read
error into a logged, counted miss, so that the caller falls back to its loader and refetches.
A drop deletes exactly the copy that was read (its meta as read must still be there: a good
refill that replaced it meanwhile stays), forgets it in the eviction policy, ends its holds
(their readers find it corrupt too) and keeps its pins for the refetch (``_pending_pins``).
:meth:`RepairMixin.verify` checks every cached pack the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import lmdb

from catalog.cache import chunk_writes
from catalog.cache.cache_state import PackCacheState
from catalog.cache.chunk_reads import CorruptEntry
from catalog.cache.layout import entry_key
from catalog.digest import Digest
from catalog.errors import ResourceExhausted

if TYPE_CHECKING:
    from catalog.cache.environment import Txn

__all__ = ["CacheVerifyReport", "RepairMixin"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CacheVerifyReport:
    """What :meth:`PackCache.verify` checked and dropped."""

    checked: int
    checked_bytes: int
    corrupt: tuple[Digest, ...]


class RepairMixin(PackCacheState):
    """Corrupt-copy handling, mixed into :class:`~catalog.cache.pack_cache.PackCache`."""

    def verify(self) -> CacheVerifyReport:
        """Read and verify every cached pack against its digest; drop the corrupt ones.

        A dropped pinned pack keeps its pins for its next fill (in this process).

        Raises:
            FailedPrecondition: the cache is closed.
        """
        checked = checked_bytes = 0
        corrupt: list[Digest] = []
        for entry in self.entries():
            name = str(entry.digest)
            try:
                data = self._read_whole(entry.digest, name)
            except CorruptEntry as exc:
                if self._drop_corrupt(entry.digest, exc, name):
                    corrupt.append(entry.digest)
                continue
            if data is not None:
                checked += 1
                checked_bytes += len(data)
        return CacheVerifyReport(checked, checked_bytes, tuple(corrupt))

    def _cached(
        self,
        digest: Digest,
        read: Callable[[Digest, str], T | None],
        name: str,
    ) -> T | None:
        """``read(digest, name)``, with a corrupt copy dropped and an LMDB failure logged, both
        turned into ``None`` (a miss) so that the caller falls back to its loader."""
        try:
            return read(digest, name)
        except CorruptEntry as exc:
            self._drop_corrupt(digest, exc, name)
        except lmdb.Error as exc:
            log.warning("pack cache %s: reading %s (%s) failed: %s", self.path, name, digest, exc)
            with self._lock:
                self._counters.read_errors += 1
        return None

    def _drop_corrupt(self, digest: Digest, corrupt: CorruptEntry, name: str) -> bool:
        """Delete the copy that failed verification, unless it was replaced meanwhile.

        Its pins wait for the next fill. Returns whether this call dropped it.
        """
        key, ekey = str(digest), entry_key(digest)
        with self._write_lock:

            def drop(txn: Txn) -> bool:
                if txn.get(ekey, db=self._env.entries) != corrupt.seen_meta:
                    return False  # already dropped, or refilled with a good copy
                chunk_writes.delete_entry(txn, self._env.tables, ekey)
                return True

            try:
                dropped = self._env.write(drop)
            except (lmdb.Error, ResourceExhausted) as exc:
                log.warning("pack cache %s: dropping corrupt %s failed: %s", self.path, name, exc)
                dropped = True  # forget it anyway; a later fill overwrites what is on disk
            if not dropped:
                return False
            with self._lock:
                if key in self._policy:
                    pins = self._pins.pop(key, 0)
                    # A reader holding the corrupt copy found it corrupt too (or will): its
                    # release finds no hold and is a no-op.
                    for _ in range(pins + self._holds.pop(key, 0)):
                        self._policy.unpin(key)
                    self._policy.remove(key)
                    if pins:
                        self._pending_pins[key] = self._pending_pins.get(key, 0) + pins
                self._counters.corrupt_dropped += 1
        log.warning(
            "pack cache %s: dropped the corrupt cached copy of %s (%s): %s; refetching",
            self.path, name, digest, corrupt,
        )  # fmt: skip
        return True
