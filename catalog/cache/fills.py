"""The pack cache's miss path: one load per cold digest, then a fill if the policy admits it.

A miss calls the caller's loader once however many threads ask for the digest at the same
time (the single-flight table, ``_inflight``: the others wait for the leader's bytes or its
exception). The leader then fills: the bytes are checksummed per chunk (and checked finite,
when the cache was given a check), the eviction policy admits them or not and names its
victims, and the pack's chunks, its meta and the deletion of the victims are written in one
LMDB write transaction (:func:`catalog.cache.chunk_writes.install_entry`), so that a crash
leaves the pack wholly present or absent. A failed write is logged and counted, never raised:
the loaded bytes are good whatever happened to the cache. Pins asked for before the pack was
cached (``_pending_pins``) are applied by the fill, which then bypasses admission.

A pack whose durable copy is an immutable file on the cache's filesystem (a ``file://`` store)
is filled as a reference to that file instead of a second copy (:meth:`FillMixin._reference_for`).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING

import lmdb

from catalog.cache import chunk_writes
from catalog.cache.cache_state import Loader, PackCacheState
from catalog.cache.layout import EntryMeta, entry_key
from catalog.digest import Digest
from catalog.errors import CatalogError, Internal

if TYPE_CHECKING:
    from catalog.cache.environment import Txn

__all__ = ["FillMixin"]

log = logging.getLogger(__name__)


class FillMixin(PackCacheState):
    """Loads on a miss and fills, mixed into :class:`~catalog.cache.pack_cache.PackCache`."""

    def _load(self, digest: Digest, loader: Loader, name: str, *, recheck: bool) -> bytes | None:
        """Load through ``loader`` once per digest at a time; ``None`` when, with ``recheck``,
        the pack was cached since the caller looked (the caller reads it again).

        Raises what ``loader`` raises, and ``Internal`` when it returns something that is not
        bytes.
        """
        key = str(digest)
        with self._lock:
            flight = self._inflight.get(key)
            if flight is None and recheck and key in self._policy:
                return None  # a fill committed between the caller's read and now
            self._counters.misses += 1
            leader = flight is None
            if flight is None:
                flight = self._inflight[key] = Future()
                self._counters.loads += 1
            else:
                self._counters.coalesced += 1
        if not leader:  # an admission's flight has no bytes (None): with recheck, read again
            if (loaded := flight.result()) is not None or recheck:
                return loaded
            return self._load(digest, loader, name, recheck=False)
        try:
            data = _as_bytes(loader(), name)
            self._fill(digest, data, name)
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            flight.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
        flight.set_result(data)
        return data

    def _fill(self, digest: Digest, data: bytes, name: str) -> None:
        """Cache ``data`` if it is admitted; a failure to write is logged, never raised."""
        if not data:
            return
        # Checked on the bytes the checksums are taken of: the flag and the checksums describe
        # the same bytes (see ``layout``).
        finite = self._values_finite is not None and self._values_finite(data)
        meta = EntryMeta.for_data(
            data, self.chunk_bytes, file=self._reference_for(digest, data), values_finite=finite
        )
        try:
            self._install(digest, data, meta)
        except (lmdb.Error, CatalogError) as exc:
            # The bytes are good whatever happened to the cache (full map, closed meanwhile).
            log.warning("pack cache %s: caching %s (%s) failed: %s", self.path, name, digest, exc)
            with self._lock:
                self._counters.fill_failures += 1

    def _reference_for(self, digest: Digest, data: bytes) -> str:
        """The durable file to reference instead of storing ``data`` again; "" for none."""
        if self._local_files is None:
            return ""
        path = self._local_files(digest)
        if path is None:
            return ""
        try:
            path = path.resolve(strict=True)
            found, here = path.stat(), self.path.stat()
        except OSError:
            return ""
        if found.st_dev != here.st_dev or found.st_size != len(data):
            return ""  # another filesystem: a reference would not save this disk anything
        return str(path)

    def _install(self, digest: Digest, data: bytes, meta: EntryMeta) -> None:
        """Write ``data`` with ``meta`` if the policy admits it (or pins are pending for it),
        deleting the policy's victims in the same transaction.

        Raises what the write raises (``lmdb.Error``, ``ResourceExhausted`` at the map's
        limit, ``FailedPrecondition`` once closed), after undoing a new entry's bookkeeping.
        """
        key, size = str(digest), len(data)
        policy = self._policy
        with self._write_lock:
            with self._lock:
                pins = self._pending_pins.pop(key, 0)
                resident = key in policy
                victims: list[str] = []
                if resident:
                    # Tracked but unreadable (an LMDB read error): rewrite it in place.
                    for _ in range(pins):
                        policy.pin(key)
                    self._set_pin_count(key, self._pins.get(key, 0) + pins)
                else:
                    fits = (
                        size <= policy.capacity_bytes - policy.pinned_bytes
                        if pins
                        else policy.admit(key, size)
                    )
                    if not fits:
                        if pins:
                            self._pending_pins[key] = pins
                        self._counters.not_admitted += 1
                        return
                    victims = policy.victims(size)
                    policy.record_insert(key, size)
                    for _ in range(pins):
                        policy.pin(key)
                    self._set_pin_count(key, pins)
                    self._counters.evictions += len(victims)
                meta = meta.with_pins(self._pins.get(key, 0))
            try:
                self._env.write(
                    lambda txn: chunk_writes.install_entry(
                        txn, self._env.tables, digest, data, meta, victims
                    )
                )
            except BaseException:
                if not resident:
                    with self._lock:
                        for _ in range(self._pins.pop(key, 0)):
                            policy.unpin(key)
                        policy.remove(key)
                    self._delete_quietly([*victims, key])
                raise
            with self._lock:
                self._counters.fills += 1
                self._counters.bytes_filled += size
                self._counters.referenced_fills += bool(meta.file)

    def _delete_quietly(self, keys: list[str]) -> None:
        """Best effort after a failed fill: the policy already forgot these keys."""
        try:
            ekeys = [entry_key(Digest.parse(key)) for key in keys]

            def delete(txn: Txn) -> None:
                for ekey in ekeys:
                    chunk_writes.delete_entry(txn, self._env.tables, ekey)

            self._env.write(delete)
        except Exception as exc:  # the original failure is what the caller reports
            log.warning("pack cache %s: cleanup after a failed fill failed: %s", self.path, exc)


def _as_bytes(data: object, name: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise Internal(f"the loader for {name} returned {type(data).__name__}, not bytes")
