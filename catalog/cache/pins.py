"""What keeps a cached pack in the pack cache, and what takes it out on request.

- Pins (:meth:`PinMixin.pin`, :meth:`PinMixin.unpin`): counted, persisted in the entry's meta
  (so a restarted cache has them), pinned in the eviction policy. A pin asked for a pack that
  is not cached loads it first and is applied by the fill (``_pending_pins``); a pinned copy
  dropped as corrupt keeps its pins for its refetch.
- Holds (:meth:`PinMixin.hold`, :meth:`PinMixin.release`): pins kept in memory only, for a
  reader in another process (a colocated engine, under a lease of
  :mod:`catalog.cache.leases`) that reads the chunks itself; such a read counts as a hit here,
  as does one reported without a hold (:meth:`PinMixin.record_read`).
- Eviction on request (:meth:`PinMixin.evict`), refused for a pinned or held pack.

The in-memory change and the meta's change happen under ``_write_lock``, in that order, and
the in-memory one is undone when the write fails.
"""

from __future__ import annotations

import contextlib

from catalog.cache import chunk_writes
from catalog.cache.cache_state import Loader, PackCacheState
from catalog.cache.layout import entry_key
from catalog.digest import Digest
from catalog.errors import FailedPrecondition, NotFound, ResourceExhausted

__all__ = ["PinMixin"]


class PinMixin(PackCacheState):
    """Pins, holds and eviction, mixed into :class:`~catalog.cache.pack_cache.PackCache`."""

    def pin(
        self, digest: Digest, loader: Loader | None = None, *, name_for_errors: str = ""
    ) -> None:
        """Keep ``digest``'s pack cached until as many :meth:`unpin` calls; pins persist.

        A pack that is not cached is loaded through ``loader`` first (bypassing the policy's
        admission, single flight as in :meth:`read_through`); without a loader that is an
        error, so a pin is always on bytes that are in the cache when it returns.

        Raises:
            NotFound: the pack is not cached and no ``loader`` was given.
            ResourceExhausted: the pack does not fit the capacity beside the pinned bytes.
            As :meth:`read_through` for the loader.
        """
        self._check_open()
        name = name_for_errors or str(digest)
        if self._pin_resident(digest):
            return
        if loader is None:
            raise NotFound(f"{name} is not in the pack cache at {self.path}; nothing to pin")
        key = str(digest)
        with self._lock:
            self._pending_pins[key] = self._pending_pins.get(key, 0) + 1
        try:
            self.read_through(digest, loader, name_for_errors=name)
        finally:
            # Pins are counted, not owned: if a fill consumed one pending pin, ours is applied.
            with self._lock:
                pending = self._pending_pins.get(key, 0)
                if pending > 1:
                    self._pending_pins[key] = pending - 1
                else:
                    self._pending_pins.pop(key, None)
        if pending == 0:
            return
        if not self._pin_resident(digest):
            with self._lock:
                room = self._policy.capacity_bytes - self._policy.pinned_bytes
            raise ResourceExhausted(
                f"{name} cannot be pinned in the pack cache at {self.path}: it does not fit "
                f"beside the pinned packs ({room} of {self._policy.capacity_bytes} bytes free)"
            )

    def unpin(self, digest: Digest) -> None:
        """Drop one pin of ``digest``; with the last one it can be evicted again.

        Raises:
            NotFound: the pack is not cached.
            FailedPrecondition: it is not pinned.
        """
        self._check_open()
        key = str(digest)
        with self._write_lock:
            with self._lock:
                if key not in self._policy:
                    pending = self._pending_pins.get(key, 0)
                    if pending:  # a pinned pack dropped as corrupt, awaiting its refetch
                        self._pending_pins[key] = pending - 1
                        if pending == 1:
                            del self._pending_pins[key]
                        return
                    raise NotFound(f"{digest} is not in the pack cache at {self.path}")
                count = self._pins.get(key, 0)
                if count == 0:
                    raise FailedPrecondition(f"{digest} is not pinned in the pack cache")
                self._policy.unpin(key)
                self._set_pin_count(key, count - 1)
            try:
                self._write_pin_count(digest, count - 1)
            except Exception:
                with self._lock:
                    self._policy.pin(key)
                    self._set_pin_count(key, count)
                raise

    def _pin_resident(self, digest: Digest) -> bool:
        """Add a pin to a cached pack; ``False`` (nothing done) when it is not cached."""
        key = str(digest)
        with self._write_lock:
            with self._lock:
                if key not in self._policy:
                    return False
                self._policy.pin(key)
                count = self._pins.get(key, 0) + 1
                self._set_pin_count(key, count)
            try:
                self._write_pin_count(digest, count)
            except Exception:
                with self._lock:
                    self._policy.unpin(key)
                    self._set_pin_count(key, count - 1)
                raise
        return True

    def _write_pin_count(self, digest: Digest, count: int) -> None:
        """Record ``count`` in the entry's meta (the caller holds ``_write_lock``)."""
        self._env.write(
            lambda txn: chunk_writes.set_entry_pins(txn, self._env.tables, digest, count, self.path)
        )

    def hold(self, digest: Digest, loader: Loader | None = None, *, name_for_errors: str) -> bool:
        """Keep ``digest``'s cached pack from eviction and rewrite until :meth:`release`.

        A hold is a pin kept in memory only (a restarted cache has none), for a reader in
        another process (a colocated engine) that reads the chunks itself; it counts as a hit
        of the whole pack. A pack that is not cached is first loaded through ``loader`` (single
        flight, admitted by the policy, as in :meth:`read_through`). Returns ``False`` (nothing
        held) when the pack is not cached and there is no loader, or the policy did not admit
        it, or it was evicted again before it could be held.

        Raises:
            As :meth:`read_through` for the loader.
            FailedPrecondition: the cache is closed.
        """
        self._check_open()
        key = str(digest)
        for attempt in range(3):
            with self._lock:
                # A fill records the key in the policy before its transaction commits; while
                # its flight is open the entry may not be readable by another process yet.
                flight = self._inflight.get(key)
                if flight is None and key in self._policy:
                    self._policy.pin(key)
                    self._holds[key] = self._holds.get(key, 0) + 1
                    self._count_whole_read(key)
                    return True
            if attempt == 2:
                break
            if flight is not None:
                with contextlib.suppress(Exception):  # the loader's error is the leader's
                    flight.result()
            elif loader is not None:
                self._load(digest, loader, name_for_errors, recheck=True)
            else:
                break
        return False

    def release(self, digest: Digest) -> None:
        """Drop one :meth:`hold` of ``digest``; a no-op when it holds none (a copy dropped as
        corrupt loses its holds)."""
        key = str(digest)
        with self._lock:
            count = self._holds.get(key, 0)
            if not count:
                return
            if count == 1:
                del self._holds[key]
            else:
                self._holds[key] = count - 1
            self._policy.unpin(key)

    def holds(self, digest: Digest) -> int:
        """How many :meth:`hold` calls on ``digest`` are not released."""
        with self._lock:
            return self._holds.get(str(digest), 0)

    def record_read(self, digest: Digest) -> bool:
        """Count a whole-pack read of ``digest`` that a reader in another process made without
        a :meth:`hold` (it found the pack in the tier and checked it): a hit, as a hold is.
        ``False`` (nothing recorded) when the pack is not cached (evicted since, say).

        Raises:
            FailedPrecondition: the cache is closed.
        """
        self._check_open()
        key = str(digest)
        with self._lock:
            if key in self._inflight or key not in self._policy:
                return False
            self._count_whole_read(key)
            return True

    def _count_whole_read(self, key: str) -> None:
        """Count a hit of the whole of ``key``'s cached pack (the caller holds ``_lock``)."""
        self._policy.record_hit(key)
        self._counters.hits += 1
        self._counters.bytes_read += self._policy.size_of(key)

    def evict(self, digest: Digest) -> None:
        """Remove ``digest``'s pack from the cache now.

        Raises:
            NotFound: the pack is not cached.
            FailedPrecondition: it is pinned, or held by a reader in another process.
        """
        self._check_open()
        key = str(digest)
        with self._write_lock:
            with self._lock:
                if key not in self._policy:
                    raise NotFound(f"{digest} is not in the pack cache at {self.path}")
                pins = self._pins.get(key, 0)
                if pins:
                    raise FailedPrecondition(
                        f"{digest} is pinned {pins} time(s) in the pack cache; unpin it first"
                    )
                if self._holds.get(key):
                    raise FailedPrecondition(
                        f"{digest} is leased by an engine reading it from the pack cache; "
                        "evict it after the lease ends"
                    )
                self._policy.remove(key)
                self._counters.evicted_on_request += 1
            # If this fails the bytes stay on disk untracked; the next fill of the digest, or
            # the next open, deals with them.
            ekey = entry_key(digest)
            self._env.write(lambda txn: chunk_writes.delete_entry(txn, self._env.tables, ekey))
