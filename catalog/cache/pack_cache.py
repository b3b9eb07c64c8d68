"""The NVMe tier: a byte-bounded cache of pack bytes in an LMDB environment on local disk.

>>> cache = PackCache(Path("/var/cache/loracat"), capacity_bytes=64 << 30)
>>> data = cache.read_through(digest, lambda: durable_read(digest), name_for_errors="acme/x@3")

Reads go through the cache: a hit returns verified cached bytes, a miss calls the loader (one
call per cold digest however many threads ask at once), stores what it returns under the byte
budget, evicting what the eviction policy (:mod:`catalog.cache.policies`) chooses, and returns it.

Layout: one LMDB environment per directory, written by one process at a time (this class) and
readable by colocated engines in other processes; :mod:`catalog.cache.layout` defines it.
The bytes are stored uncompressed: ``bench/bench_pack_cache.py`` measured zstd shrinking
bf16 LoRA weights only 1.28x (1.46x byte-shuffled), with a compressed hit, decoding included,
at about half the speed of an uncompressed one; it pays on S3 and the wire.

Integrity. A whole-pack read is hashed and compared with the digest (sha256). A ranged read
checks only the chunks it touches, against the checksums recorded when the pack was written
from the very bytes the loader returned, which the caller had verified against the digest: a
chunk that matches holds the verified bytes unless someone forged it (XXH3-128 detects
corruption, not forgery; :mod:`catalog.cache.layout` says why that is the right check), at ~45
GB/s against sha256's ~1 GB/s. A cached copy that fails either check is dropped
(``corrupt_dropped`` in :meth:`PackCache.stats`) and the read falls through to the loader as
a miss; a pinned copy keeps its pins through the refetch.

Crash safety. Each fill writes all of a pack's chunks, its meta and the deletion of its
victims in one LMDB write transaction, so after a SIGKILL (or a power loss, with
``sync=True``) a pack is either wholly present or absent. Opening a directory still scans for
chunks without a valid meta (and metas that cannot be decoded) and deletes them, so nothing a
future writer or a damaged file leaves behind can be served or counted.

Holds. A colocated engine reads a pack's chunks straight from the environment (see
:mod:`catalog.client.colocated`); while it does, the catalog keeps a :meth:`PackCache.hold` on
the entry (a pin kept in memory, granted and ended by the lease RPCs, see
:mod:`catalog.cache.leases`), so the entry is neither evicted nor rewritten under it. A reader's
LMDB read transaction would keep its snapshot's pages from reuse anyway; the hold keeps the
entry itself, so that a granted lease is a hit for its reader.

Restart. Opening a directory rebuilds the policy from the entries on disk in insertion order
(pinned entries first, so they keep their room), with their pins; if the capacity shrank, the
oldest unpinned entries are evicted until the rest fit.

Parts. This module puts the cache together and owns opening (with the restart above),
listing and stats; each other concern is a module of its own, mixed in: reads
(:mod:`catalog.cache.reads`), the miss path and fills (:mod:`catalog.cache.fills`), pins,
holds and eviction (:mod:`catalog.cache.pins`), corrupt-copy repair
(:mod:`catalog.cache.repair`), admission at push (:mod:`catalog.cache.admission`); the LMDB
environment itself (directory lock, schema, transactions, map growth) is
:class:`~catalog.cache.environment.CacheEnvironment`. The locking all of them follow is
described in :mod:`catalog.cache.cache_state`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from catalog.cache import chunk_writes, restore
from catalog.cache.admission import AdmissionMixin
from catalog.cache.cache_state import CacheCounters, Loader
from catalog.cache.chunk_writes import initial_map_size
from catalog.cache.environment import CacheEnvironment
from catalog.cache.fills import FillMixin
from catalog.cache.layout import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    EntryMeta,
    chunk_key,
    digest_of_key,
    entry_key,
)
from catalog.cache.pins import PinMixin
from catalog.cache.policies import DEFAULT_POLICY, EvictionPolicy, make_policy
from catalog.cache.reads import ReadMixin
from catalog.cache.repair import CacheVerifyReport, RepairMixin
from catalog.digest import Digest
from catalog.errors import InvalidArgument

if TYPE_CHECKING:
    from catalog.cache.environment import Txn

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "CacheEntry",
    "CacheVerifyReport",
    "Loader",
    "PackCache",
    "chunk_key",
    "entry_key",
]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached pack, as :meth:`PackCache.entries` lists it."""

    digest: Digest
    size: int
    pins: int
    #: When the pack was written into the cache (unix seconds).
    inserted_at: float

    @property
    def pinned(self) -> bool:
        return self.pins > 0


class PackCache(ReadMixin, PinMixin, RepairMixin, FillMixin, AdmissionMixin):
    """A byte-bounded, crash-safe cache of verified pack bytes in LMDB (see the module doc).

    Thread safe. One process at a time may open a directory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        policy: str = DEFAULT_POLICY,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sync: bool = True,
        map_size: int | None = None,
        max_map_size: int | None = None,
        local_files: Callable[[Digest], Path | None] | None = None,
        values_finite: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Open (creating if missing) the cache in directory ``path``.

        Args:
            capacity_bytes: the budget of pack bytes (LMDB's page overhead, under 1% with 1 MiB
                chunks, is not counted; :meth:`stats` reports the file's size beside it).
            policy: an eviction policy name from ``POLICIES``, or ``"default"``.
            chunk_bytes: bytes per stored chunk for packs written from now on (packs already
                cached keep the chunk size they were written with).
            sync: fsync each commit. Without it a SIGKILL still loses nothing that was
                committed, but a power loss may lose recent fills or damage the file.
            map_size: the initial LMDB map (address space, not disk; default about 1.25x the
                capacity plus 64 MiB). It doubles whenever LMDB reports it full...
            max_map_size: ...up to this (default 4x the initial map); beyond it fills are
                served without caching and counted as ``fill_failures``.
            local_files: where the durable tier keeps a pack as an immutable local file (a
                ``file://`` store). A pack whose file is on this cache's filesystem is cached as
                a reference to that file (its meta and checksums, no second copy; counted as
                ``referenced_fills``); its bytes still count against ``capacity_bytes``.
            values_finite: whether a pack's values are all finite (``catalog.pack.finite``),
                asked once per fill; ``True`` is recorded in the entry's meta (format 3's
                ``FLAG_VALUES_FINITE``), so that colocated engines need not check again.

        Raises:
            InvalidArgument: bad capacity, policy name, chunk size or map size.
            FailedPrecondition: another process (or another ``PackCache`` in this one) has the
                directory open, or it holds a cache of another schema version.
            Unavailable: the directory or its LMDB environment cannot be opened.
        """
        if type(chunk_bytes) is not int or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise InvalidArgument(
                f"chunk_bytes must be an integer in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], "
                f"got {chunk_bytes!r}"
            )
        self._policy: EvictionPolicy = make_policy(policy, capacity_bytes)
        self._local_files = local_files
        self._values_finite = values_finite
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        initial = initial_map_size(capacity_bytes, chunk_bytes) if map_size is None else map_size
        self._env = CacheEnvironment(
            self.path,
            map_size=initial,
            max_map_size=4 * initial if max_map_size is None else max_map_size,
            sync=sync,
        )
        #: A random id kept in the environment: readers in other processes check it.
        self.instance_id = self._env.instance_id
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._counters = CacheCounters()
        self._pins = {}
        self._pending_pins = {}
        self._holds = {}
        self._inflight = {}
        try:
            self._restore()
        except BaseException:
            self._env.close()
            raise

    def _restore(self) -> None:
        """Rebuild the policy from disk; delete orphan chunks, bad metas and what no longer fits
        (see :mod:`catalog.cache.restore`)."""
        with self._env.lmdb.begin() as txn:
            found = restore.scan(txn, self._env.tables, str(self.path))
        self._pins.update(restore.rebuild_policy(self._policy, found, str(self.path)))
        doomed, orphans = found.doomed, found.orphans
        self._counters.dropped_on_open = len(doomed)
        self._counters.orphan_chunks_removed = len(orphans)
        if doomed or orphans:

            def delete(txn: Txn) -> None:
                for key in doomed:
                    chunk_writes.delete_entry(txn, self._env.tables, key)
                for key in orphans:
                    txn.delete(key, db=self._env.chunks)

            with self._write_lock:
                self._env.write(delete)

    # -- what is cached ----------------------------------------------------------------------------

    def contains(self, digest: Digest) -> bool:
        """Whether ``digest``'s pack is cached (not counted as a request)."""
        with self._lock:
            return str(digest) in self._policy

    def entries(self) -> Iterator[CacheEntry]:
        """Every cached pack, in digest order (a snapshot taken when called).

        Raises:
            FailedPrecondition: the cache is closed.
        """
        self._check_open()

        def collect(txn: Txn) -> list[CacheEntry]:
            found = []
            for key, raw in txn.cursor(db=self._env.entries):
                try:
                    meta = EntryMeta.decode(raw)
                    digest = digest_of_key(bytes(key))
                except (ValueError, LookupError):
                    continue  # a damaged meta; reading it drops it
                found.append(CacheEntry(digest, meta.size, meta.pins, meta.inserted_ns / 1e9))
            return found

        return iter(self._env.read(collect))

    def stats(self) -> dict[str, Any]:
        """Counters since open and the current occupancy.

        Keys: ``bytes`` (cached pack bytes), ``entries``, ``capacity_bytes``, ``pinned``
        (entries), ``pinned_bytes``, ``hits``, ``misses`` (requests not served from the cache,
        including ``coalesced`` ones that waited for another caller's load), ``loads`` (loader
        calls), ``fills`` (packs written), ``not_admitted`` (loaded but not cached: refused by
        the policy or too large), ``fill_failures``, ``evictions`` (chosen by the policy),
        ``evicted_on_request``, ``bytes_read`` (served by hits), ``bytes_filled``,
        ``corrupt_dropped``, ``read_errors``, ``orphan_chunks_removed`` and ``dropped_on_open``
        (at open), ``policy``, ``chunk_bytes``, ``path``, ``file_bytes`` (the LMDB data file),
        ``map_size``.
        """
        with self._lock:
            counters = dict(vars(self._counters))
            occupancy = {
                "bytes": self._policy.used_bytes,
                "entries": len(self._policy),
                "capacity_bytes": self._policy.capacity_bytes,
                "pinned": len(self._pins),
                "pinned_bytes": self._policy.pinned_bytes,
            }
        map_size = self._env.map_size()
        return {
            **occupancy,
            **counters,
            "policy": self._policy.name,
            "chunk_bytes": self.chunk_bytes,
            "path": str(self.path),
            "file_bytes": self._env.data_file_bytes(),
            "map_size": map_size,
        }

    def clear_stale_readers(self) -> int:
        """Free the LMDB reader slots of processes that died mid-read (a stale slot keeps
        every page freed after its snapshot from reuse, so the file grows). Returns how many.

        Raises:
            FailedPrecondition: the cache is closed.
        """
        return self._env.clear_stale_readers()

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the environment and release the directory; later calls raise. Idempotent."""
        with self._write_lock:
            self._env.close()

    def __enter__(self) -> PackCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PackCache({str(self.path)!r}, capacity_bytes={self._policy.capacity_bytes}, "
            f"policy={self._policy.name!r})"
        )
