"""Leases on the NVMe tier's entries, for engines that read pack bytes themselves.

A colocated engine (same host as the catalog) asks the catalog for a lease on a pack over gRPC,
then reads the chunks straight from the pack cache's LMDB environment
(:mod:`catalog.client.colocated`) and releases the lease. While the lease lives, the entry
holds a :meth:`~catalog.cache.pack_cache.PackCache.hold` (an in-memory pin): it is neither
evicted nor rewritten, so the engine finds the entry the lease promised.

A lease has a time to live and is never renewed: a reader that dies (SIGKILL mid-read) never
releases it, and the sweeper thread ends it when its time is up, so nothing stays pinned for
good. The same sweep frees the LMDB reader slots that dead readers left behind
(``mdb_reader_check``): a stale slot would keep every page freed after its snapshot from reuse.
Leases live in the catalog process only; a restarted catalog has none (and a reader still
inside its read transaction keeps its snapshot whatever the new catalog does).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from catalog.cache.pack_cache import Loader, PackCache
from catalog.digest import Digest
from catalog.errors import CatalogError, InvalidArgument, ResourceExhausted, Unavailable

__all__ = ["DEFAULT_LEASE_TTL_S", "MAX_LEASE_TTL_S", "PackLease", "PackLeases"]

log = logging.getLogger(__name__)

#: What a lease lives when the caller does not say: far above a read of the largest pack from
#: local NVMe (a GB/s), low enough that a dead engine's pin is gone within a minute.
DEFAULT_LEASE_TTL_S = 30.0
MAX_LEASE_TTL_S = 600.0
#: Leases alive at once, at most: each pins its entry, so an engine that leased without end
#: could pin the whole tier; beyond this a lease is refused and the engine streams instead.
MAX_ACTIVE_LEASES = 4096
#: How often the sweeper looks for stale LMDB reader slots when no lease is due.
READER_CHECK_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class PackLease:
    """A granted lease: ``lease_id`` releases it; it ends by itself after ``ttl_s``."""

    lease_id: str
    digest: Digest
    ttl_s: float
    expires_at: float = field(compare=False)  # on the table's clock (monotonic)
    #: What the pack is called in errors and logs (``acme/x@3``).
    name: str = field(default="", compare=False)
    size_bytes: int = field(default=0, compare=False)
    #: Where its verified bytes come from when the cached copy must be refilled.
    loader: Loader = field(default=bytes, compare=False, repr=False)


@dataclass
class _Counters:
    granted: int = 0
    released: int = 0
    expired: int = 0
    not_admitted: int = 0
    refused: int = 0  # over max_active
    stale_readers_cleared: int = 0


class PackLeases:
    """The catalog's table of leases on ``cache``'s entries, with a sweeper thread.

    Thread safe. ``close()`` ends the sweeper and releases every lease.
    """

    def __init__(
        self,
        cache: PackCache,
        *,
        default_ttl_s: float = DEFAULT_LEASE_TTL_S,
        max_active: int = MAX_ACTIVE_LEASES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.default_ttl_s = default_ttl_s
        self.max_active = max_active
        self._clock = clock
        self._leases: dict[str, PackLease] = {}
        self._counters = _Counters()
        self._cond = threading.Condition()
        self._closed = False
        self._sweeper = threading.Thread(
            target=self._sweep_forever, name="loracat-lease-sweeper", daemon=True
        )
        self._sweeper.start()

    def grant(
        self,
        digest: Digest,
        loader: Loader,
        *,
        name_for_errors: str,
        size_bytes: int,
        ttl_s: float = 0.0,
    ) -> PackLease | None:
        """Hold ``digest``'s pack in the cache (loading it through ``loader`` first when it is
        cold: one durable read however many engines ask at once) for ``ttl_s`` seconds (0: the
        default). ``None`` when the cache's policy did not admit the pack.

        Raises:
            InvalidArgument: ``ttl_s`` negative or above ``MAX_LEASE_TTL_S``.
            ResourceExhausted: ``max_active`` leases are alive already.
            As ``PackCache.hold`` (the loader's errors, e.g. ``DataLoss``).
        """
        if not 0 <= ttl_s <= MAX_LEASE_TTL_S:
            raise InvalidArgument(
                f"a lease lives between 0 (the default, {self.default_ttl_s:g} s) and "
                f"{MAX_LEASE_TTL_S:g} seconds, got {ttl_s:g}"
            )
        ttl = ttl_s or self.default_ttl_s
        with self._cond:
            if len(self._leases) >= self.max_active:
                self._counters.refused += 1
                raise ResourceExhausted(
                    f"{self.max_active} pack leases are alive already; read over FetchPack"
                )
        if not self.cache.hold(digest, loader, name_for_errors=name_for_errors):
            with self._cond:
                self._counters.not_admitted += 1
            return None
        lease = PackLease(
            secrets.token_hex(16),
            digest,
            ttl,
            self._clock() + ttl,
            name=name_for_errors,
            size_bytes=size_bytes,
            loader=loader,
        )
        with self._cond:
            if self._closed:
                self.cache.release(digest)
                raise Unavailable("the catalog is closing; no new leases")
            self._leases[lease.lease_id] = lease
            self._counters.granted += 1
            self._cond.notify()
        return lease

    def release(self, lease_id: str) -> PackLease | None:
        """End a lease; ``None`` when there is no such lease (it expired, or never existed)."""
        with self._cond:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return None
            self._counters.released += 1
        self.cache.release(lease.digest)
        return lease

    def active(self) -> int:
        with self._cond:
            return len(self._leases)

    def stats(self) -> dict[str, int]:
        """``active`` leases and the counters since start: ``granted``, ``released``,
        ``expired``, ``not_admitted``, ``refused`` (over ``max_active``),
        ``stale_readers_cleared``."""
        with self._cond:
            return {"active": len(self._leases), **vars(self._counters)}

    def sweep(self) -> int:
        """End the leases whose time is up and free stale reader slots; returns how many
        leases ended. (The sweeper thread calls this; tests may too.)"""
        now = self._clock()
        with self._cond:
            due = [lease for lease in self._leases.values() if lease.expires_at <= now]
            for lease in due:
                del self._leases[lease.lease_id]
            self._counters.expired += len(due)
        for lease in due:
            log.warning(
                "lease %s on %s expired after %g s unreleased (its reader died or hung)",
                lease.lease_id, lease.digest, lease.ttl_s,
            )  # fmt: skip
            self.cache.release(lease.digest)
        self._clear_stale_readers()
        return len(due)

    def close(self) -> None:
        """Stop the sweeper and release every lease. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            leases = list(self._leases.values())
            self._leases.clear()
            self._cond.notify()
        self._sweeper.join()
        for lease in leases:
            self.cache.release(lease.digest)

    def _clear_stale_readers(self) -> None:
        try:
            cleared = self.cache.clear_stale_readers()
        except CatalogError:  # closed under us: nothing left to clear
            return
        if cleared:
            with self._cond:
                self._counters.stale_readers_cleared += cleared

    def _sweep_forever(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                next_due = min((lease.expires_at for lease in self._leases.values()), default=None)
                wait = READER_CHECK_INTERVAL_S
                if next_due is not None:
                    wait = min(wait, next_due - self._clock())
                if wait > 0:
                    self._cond.wait(wait)  # a grant wakes it to look at the new expiry
                if self._closed:
                    return
            try:
                self.sweep()
            except Exception:  # never let the sweeper die: leases would stay forever
                log.exception("lease sweep failed")
                time.sleep(1.0)
