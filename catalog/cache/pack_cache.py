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

Locking. ``_lock`` guards the in-memory state (policy, counters, single-flight table) and is
held only for bookkeeping, never across LMDB I/O, hashing or a loader call. ``_write_lock``
serialises the writers (LMDB allows one write transaction at a time anyway) so that the policy
and the environment change in the same order; hits never take it. Every transaction holds
``_gate`` shared; growing the map takes it exclusively, as ``mdb_env_set_mapsize`` requires.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar

import lmdb

from catalog.cache import chunk_reads, chunk_writes, restore
from catalog.cache.admission import AdmissionMixin
from catalog.cache.chunk_reads import CorruptEntry, check_offset
from catalog.cache.chunk_writes import MAP_ALIGN, initial_map_size
from catalog.cache.layout import (
    CHUNKS_DB,
    DATA_FILE,
    DEFAULT_CHUNK_BYTES,
    ENTRIES_DB,
    INFO_DB,
    INSTANCE_KEY,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    EntryMeta,
    chunk_key,
    digest_of_key,
    entry_key,
)
from catalog.cache.policies import DEFAULT_POLICY, EvictionPolicy, make_policy
from catalog.digest import Digest
from catalog.errors import (
    CatalogError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from catalog.locks import ReadWriteLock

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "CacheEntry",
    "CacheVerifyReport",
    "Loader",
    "PackCache",
    "chunk_key",
    "entry_key",
]

log = logging.getLogger(__name__)

#: A loader returns the pack's bytes, already verified against its digest, or raises.
Loader = Callable[[], bytes]

_LOCK_FILE = "cache.lock"

T = TypeVar("T")
if TYPE_CHECKING:
    _Txn = lmdb.Transaction[Any]  # reads use buffers=True: values are memoryviews


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


@dataclass(frozen=True, slots=True)
class CacheVerifyReport:
    """What :meth:`PackCache.verify` checked and dropped."""

    checked: int
    checked_bytes: int
    corrupt: tuple[Digest, ...]


@dataclass
class _Counters:
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


class PackCache(AdmissionMixin):
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
        self._max_map_size = 4 * initial if max_map_size is None else max_map_size
        for label, value in (("map_size", initial), ("max_map_size", self._max_map_size)):
            if type(value) is not int or value < MAP_ALIGN:
                raise InvalidArgument(f"{label} must be an integer of at least {MAP_ALIGN} bytes")
        if self._max_map_size < initial:
            raise InvalidArgument(f"max_map_size {self._max_map_size} is below map_size {initial}")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create pack cache directory {self.path}: {exc}") from exc
        self._lock_file = self._lock_directory()
        try:
            data_file = self.path / DATA_FILE
            existing = data_file.stat().st_size if data_file.exists() else 0
            self._env = lmdb.open(
                str(self.path),
                map_size=max(initial, existing),
                max_dbs=4,
                max_readers=1024,
                sync=sync,
                metasync=sync,
                meminit=False,
            )
        except lmdb.Error as exc:
            self._lock_file.close()
            raise Unavailable(f"cannot open the pack cache LMDB in {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._gate = ReadWriteLock()
        self._counters = _Counters()
        self._pins: dict[str, int] = {}  # pin counts of resident entries (also in their meta)
        self._pending_pins: dict[str, int] = {}  # pins to apply when the key is next filled
        self._holds: dict[str, int] = {}  # in-memory pins of readers in other processes
        self._inflight: dict[str, Future[bytes]] = {}
        self._closed = False
        try:
            self._chunks = self._env.open_db(CHUNKS_DB)
            self._entries = self._env.open_db(ENTRIES_DB)
            self._tables = chunk_reads.Tables(self._chunks, self._entries)
            self._info = self._env.open_db(INFO_DB)
            self._check_schema()
            self._restore()
        except BaseException:
            self._env.close()
            self._lock_file.close()
            raise

    def _lock_directory(self) -> IO[bytes]:
        lock_file = open(self.path / _LOCK_FILE, "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise FailedPrecondition(
                f"pack cache directory {self.path} is already open (in this or another process)"
            ) from None
        return lock_file

    def _check_schema(self) -> None:
        with self._env.begin(write=True) as txn:
            found = txn.get(SCHEMA_KEY, db=self._info)
            if found is None:
                txn.put(SCHEMA_KEY, str(SCHEMA_VERSION).encode(), db=self._info)
            elif found != str(SCHEMA_VERSION).encode():
                raise FailedPrecondition(
                    f"pack cache at {self.path} has schema {found.decode(errors='replace')!r}, "
                    f"this version reads {SCHEMA_VERSION}; delete the directory to start empty"
                )
            instance = txn.get(INSTANCE_KEY, db=self._info)
            if instance is None:
                instance = secrets.token_hex(16).encode()
                txn.put(INSTANCE_KEY, instance, db=self._info)
            #: A random id kept in the environment: readers in other processes check it.
            self.instance_id = bytes(instance).decode()

    def _restore(self) -> None:
        """Rebuild the policy from disk; delete orphan chunks, bad metas and what no longer fits
        (see :mod:`catalog.cache.restore`)."""
        with self._env.begin() as txn:
            found = restore.scan(txn, self._tables, str(self.path))
        self._pins.update(restore.rebuild_policy(self._policy, found, str(self.path)))
        doomed, orphans = found.doomed, found.orphans
        self._counters.dropped_on_open = len(doomed)
        self._counters.orphan_chunks_removed = len(orphans)
        if doomed or orphans:

            def delete(txn: _Txn) -> None:
                for key in doomed:
                    chunk_writes.delete_entry(txn, self._tables, key)
                for key in orphans:
                    txn.delete(key, db=self._chunks)

            with self._write_lock:
                self._write(delete)

    # -- reads ------------------------------------------------------------------------------------

    def read_through(self, digest: Digest, loader: Loader, *, name_for_errors: str) -> bytes:
        """The verified bytes of ``digest``'s pack, from the cache or else from ``loader``.

        On a miss, ``loader()`` is called once however many threads ask for the same digest at
        the same time (the others wait for its bytes or its exception), and what it returns is
        cached if the policy admits it. ``loader`` must return bytes already verified against
        ``digest``: they are checksummed per chunk, not hashed again. A cached copy that fails
        verification is dropped and the read continues as a miss. ``name_for_errors`` (e.g.
        ``acme/x@3``) names the pack in logs and errors.

        Raises:
            Whatever ``loader`` raises (e.g. ``DataLoss`` for a corrupt durable copy).
            Internal: ``loader`` returned something that is not bytes.
            FailedPrecondition: the cache is closed.
        """
        self._check_open()
        key = str(digest)
        for attempt in range(2):
            data = self._cached(digest, self._read_whole, name_for_errors)
            if data is not None:
                self._count_hit(key, len(data))
                return data
            loaded = self._load(digest, loader, name_for_errors, recheck=attempt == 0)
            if loaded is not None:
                return loaded
        raise Internal(f"pack cache: {name_for_errors} ({digest}) vanished twice while reading")

    def read_range(
        self, digest: Digest, offset: int, length: int, loader: Loader, *, name_for_errors: str
    ) -> bytes:
        """``length`` bytes of ``digest``'s pack from ``offset`` (fewer at its end).

        A hit reads and checks only the chunks the range touches (against their fill-time
        checksums); a miss loads and caches the whole pack as :meth:`read_through` does.

        Raises:
            InvalidArgument: negative ``offset`` or ``length``, or ``offset`` past the end.
            As :meth:`read_through` otherwise.
        """
        self._check_open()
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise InvalidArgument(
                f"range of {name_for_errors}: offset and length must be non-negative integers, "
                f"got {offset!r}, {length!r}"
            )
        key = str(digest)

        def read_span(target: Digest, name: str) -> bytes | None:
            return self._read_span(target, offset, length, name)

        for attempt in range(2):
            data = self._cached(digest, read_span, name_for_errors)
            if data is not None:
                self._count_hit(key, len(data))
                return data
            loaded = self._load(digest, loader, name_for_errors, recheck=attempt == 0)
            if loaded is not None:
                check_offset(offset, len(loaded), name_for_errors)
                return loaded[offset : offset + length]
        raise Internal(f"pack cache: {name_for_errors} ({digest}) vanished twice while reading")

    def iter_range(
        self,
        digest: Digest,
        offset: int,
        length: int,
        loader: Loader,
        *,
        name_for_errors: str,
        piece_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> Iterator[bytes]:
        """:meth:`read_range` in pieces of at most ``piece_bytes``, in order, for sending a
        range out without assembling it in memory first (the catalog's ``FetchPack``).

        A hit reads each touched chunk in a read transaction of its own, checks it against its
        checksum and yields copies of its slices, so nothing stays open while the caller sends
        a piece. A copy that fails a check midway is dropped as on any read, and the rest of
        the range (like all of it on a miss) comes from ``loader`` (once per digest at a time,
        cached if admitted, as :meth:`read_through` does); so does the rest of a copy evicted
        midway. The pieces follow the chunk boundaries (a piece never spans two chunks), so
        the first and last may be short. A hit counts once, with the bytes it served.

        Raises (when called):
            InvalidArgument: negative ``offset`` or ``length``, ``piece_bytes`` < 1.
            FailedPrecondition: the cache is closed.
        Raises (while iterating): InvalidArgument for ``offset`` past the end; as
            :meth:`read_through` otherwise.
        """
        self._check_open()
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise InvalidArgument(
                f"range of {name_for_errors}: offset and length must be non-negative integers, "
                f"got {offset!r}, {length!r}"
            )
        if type(piece_bytes) is not int or piece_bytes < 1:
            raise InvalidArgument(f"piece_bytes must be a positive integer, got {piece_bytes!r}")
        return self._iter_range(digest, offset, length, loader, name_for_errors, piece_bytes)

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
                    self._policy.record_hit(key)
                    self._counters.hits += 1
                    self._counters.bytes_read += self._policy.size_of(key)
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

    def record_read(self, digest: Digest) -> bool:
        """Count a whole-pack read of ``digest`` that a reader in another process made without
        a :meth:`hold` (it found the pack in the tier and checked it): a hit, as a hold is.
        ``False`` (nothing recorded) when the pack is not cached (evicted since, say)."""
        self._check_open()
        key = str(digest)
        with self._lock:
            if key in self._inflight or key not in self._policy:
                return False
            self._policy.record_hit(key)
            self._counters.hits += 1
            self._counters.bytes_read += self._policy.size_of(key)
            return True

    def holds(self, digest: Digest) -> int:
        """How many :meth:`hold` calls on ``digest`` are not released."""
        with self._lock:
            return self._holds.get(str(digest), 0)

    def clear_stale_readers(self) -> int:
        """Free the LMDB reader slots of processes that died mid-read (a stale slot keeps
        every page freed after its snapshot from reuse, so the file grows). Returns how many.

        Raises:
            FailedPrecondition: the cache is closed.
        """

        with self._gate.shared():
            self._check_open()
            return int(self._env.reader_check())

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

        def collect(txn: _Txn) -> list[CacheEntry]:
            found = []
            for key, raw in txn.cursor(db=self._entries):
                try:
                    meta = EntryMeta.decode(raw)
                    digest = digest_of_key(bytes(key))
                except (ValueError, LookupError):
                    continue  # a damaged meta; reading it drops it
                found.append(CacheEntry(digest, meta.size, meta.pins, meta.inserted_ns / 1e9))
            return found

        return iter(self._read(collect))

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
        with self._gate.shared():
            map_size = 0 if self._closed else int(self._env.info()["map_size"])
        data_file = self.path / DATA_FILE
        return {
            **occupancy,
            **counters,
            "policy": self._policy.name,
            "chunk_bytes": self.chunk_bytes,
            "path": str(self.path),
            "file_bytes": data_file.stat().st_size if data_file.exists() else 0,
            "map_size": map_size,
        }

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

    # -- pins and eviction -------------------------------------------------------------------------

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
                self._write(
                    lambda txn: chunk_writes.set_entry_pins(
                        txn, self._tables, digest, count - 1, self.path
                    )
                )
            except Exception:
                with self._lock:
                    self._policy.pin(key)
                    self._set_pin_count(key, count)
                raise

    def evict(self, digest: Digest) -> None:
        """Remove ``digest``'s pack from the cache now.

        Raises:
            NotFound: the pack is not cached.
            FailedPrecondition: it is pinned.
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
            self._write(lambda txn: chunk_writes.delete_entry(txn, self._tables, ekey))

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the environment and release the directory; later calls raise. Idempotent."""
        with self._write_lock, self._gate.exclusive():
            if self._closed:
                return
            self._closed = True
            self._env.close()
            self._lock_file.close()

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

    # -- internals: reads --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"the pack cache at {self.path} is closed")

    def _read(self, work: Callable[[_Txn], T]) -> T:
        with self._gate.shared():
            if self._closed:
                raise FailedPrecondition(f"the pack cache at {self.path} is closed")
            with self._env.begin(buffers=True) as txn:
                return work(txn)

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

    def _read_whole(self, digest: Digest, name: str) -> bytes | None:
        """The cached pack verified against its digest; ``None`` when not cached.

        Raises ``CorruptEntry`` when it is cached but fails verification.
        """
        ekey = entry_key(digest)
        found = self._read(lambda txn: chunk_reads.read_whole(txn, self._tables, ekey, name))
        if found is None:
            return None
        data, seen = found
        actual = Digest.of(data, digest.algorithm)  # after the transaction ended
        if actual != digest:
            raise CorruptEntry(f"cached bytes of {name} hash to {actual}, not {digest}", seen)
        return data

    def _read_span(self, digest: Digest, offset: int, length: int, name: str) -> bytes | None:
        ekey = entry_key(digest)
        return self._read(
            lambda txn: chunk_reads.read_span(txn, self._tables, ekey, offset, length, name)
        )

    def _iter_range(
        self,
        digest: Digest,
        offset: int,
        length: int,
        loader: Loader,
        name: str,
        piece_bytes: int,
    ) -> Iterator[bytes]:
        key = str(digest)
        cached = None
        for attempt in range(2):
            cached = self._cached(digest, self._read_meta, name)
            if cached is not None:
                break
            loaded = self._load(digest, loader, name, recheck=attempt == 0)
            if loaded is not None:
                yield from chunk_reads.pieces(loaded, offset, offset + length, piece_bytes, name)
                return
        if cached is None:
            raise Internal(f"pack cache: {name} ({digest}) vanished twice while reading")
        check_offset(offset, cached.size, name)
        position, end = offset, min(cached.size, offset + length)
        served = 0
        try:
            while position < end:
                read = functools.partial(
                    self._read_chunk_pieces,
                    cached=cached,
                    position=position,
                    end=end,
                    piece_bytes=piece_bytes,
                )
                pieces = self._cached(digest, read, name)
                if pieces is None:  # evicted, replaced or dropped as corrupt since
                    break
                for piece in pieces:
                    served += len(piece)
                    position += len(piece)
                    yield piece
        finally:
            if served or offset == end:  # not when the first chunk was already gone
                self._count_hit(key, served)
        if position < end:
            loaded = self._load(digest, loader, name, recheck=False)
            if loaded is None:  # unreachable without recheck; keeps the type checker honest
                raise Internal(f"pack cache: {name} ({digest}) vanished while reading")
            yield from chunk_reads.pieces(loaded, position, end, piece_bytes, name)

    def _read_meta(self, digest: Digest, name: str) -> EntryMeta | None:
        ekey = entry_key(digest)
        return self._read(lambda txn: chunk_reads.read_meta(txn, self._tables, ekey, name))

    def _read_chunk_pieces(self, digest: Digest, name: str, **where: Any) -> list[bytes] | None:
        ekey = entry_key(digest)
        return self._read(
            lambda txn: chunk_reads.read_chunk_pieces(txn, self._tables, ekey, name, **where)
        )

    def _count_hit(self, key: str, size: int) -> None:
        with self._lock:
            self._counters.hits += 1
            self._counters.bytes_read += size
            # Not in the policy: evicted after the read's snapshot; the bytes were still good.
            if key in self._policy:
                self._policy.record_hit(key)

    # -- internals: misses and fills ---------------------------------------------------------------

    def _load(self, digest: Digest, loader: Loader, name: str, *, recheck: bool) -> bytes | None:
        """Load through ``loader`` once per digest at a time; ``None`` when, with ``recheck``,
        the pack was cached since the caller looked (the caller reads it again)."""
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
                self._write(
                    lambda txn: chunk_writes.install_entry(
                        txn, self._tables, digest, data, meta, victims
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
                self._write(
                    lambda txn: chunk_writes.set_entry_pins(
                        txn, self._tables, digest, count, self.path
                    )
                )
            except Exception:
                with self._lock:
                    self._policy.unpin(key)
                    self._set_pin_count(key, count - 1)
                raise
        return True

    def _set_pin_count(self, key: str, count: int) -> None:
        if count:
            self._pins[key] = count
        else:
            self._pins.pop(key, None)

    def _drop_corrupt(self, digest: Digest, corrupt: CorruptEntry, name: str) -> bool:
        """Delete the copy that failed verification, unless it was replaced meanwhile.

        Its pins wait for the next fill. Returns whether this call dropped it.
        """
        key, ekey = str(digest), entry_key(digest)
        with self._write_lock:

            def drop(txn: _Txn) -> bool:
                if txn.get(ekey, db=self._entries) != corrupt.seen_meta:
                    return False  # already dropped, or refilled with a good copy
                chunk_writes.delete_entry(txn, self._tables, ekey)
                return True

            try:
                dropped = self._write(drop)
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

    def _delete_quietly(self, keys: list[str]) -> None:
        """Best effort after a failed fill: the policy already forgot these keys."""
        try:
            ekeys = [entry_key(Digest.parse(key)) for key in keys]

            def delete(txn: _Txn) -> None:
                for ekey in ekeys:
                    chunk_writes.delete_entry(txn, self._tables, ekey)

            self._write(delete)
        except Exception as exc:  # the original failure is what the caller reports
            log.warning("pack cache %s: cleanup after a failed fill failed: %s", self.path, exc)

    # -- internals: write transactions -------------------------------------------------------------

    def _write(self, work: Callable[[_Txn], T]) -> T:
        """Run ``work`` in one write transaction, growing the map when it is full.

        The caller holds ``_write_lock``. Raises ``ResourceExhausted`` at ``max_map_size``.
        """
        while True:
            with self._gate.shared():
                if self._closed:
                    raise FailedPrecondition(f"the pack cache at {self.path} is closed")
                try:
                    with self._env.begin(write=True) as txn:
                        return work(txn)
                except lmdb.MapFullError:
                    pass
            self._grow_map()

    def _grow_map(self) -> None:
        with self._gate.exclusive():
            current = int(self._env.info()["map_size"])
            if current >= self._max_map_size:
                raise ResourceExhausted(
                    f"pack cache at {self.path} is full at its {current}-byte LMDB map "
                    "(max_map_size)"
                )
            self._env.set_mapsize(min(current * 2, self._max_map_size))


def _as_bytes(data: object, name: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise Internal(f"the loader for {name} returned {type(data).__name__}, not bytes")
