"""The colocated read path: pack bytes read straight from the catalog's NVMe tier.

When an engine runs on the catalog's host, the gRPC byte stream is the slowest leg of a fetch
(0.6-1 GB/s through gRPC's Python stream, against several GB/s from the page cache). Here the
client asks the catalog only for control: where the NVMe tier is (once), and a lease for a
read by reference (``LeasePack``: resolve, load a cold pack once for the whole host, keep the
entry from eviction and rewrite); it reads the chunks itself from the tier's LMDB environment,
opened read-only (LMDB allows any number of reader processes beside its one writer), then
releases the lease (``ReleasePackLease``). A read of a revision the caller resolved already
takes no lease when the pack is whole in the tier (see ``ColocatedPath.fetch``); such reads
are reported to the catalog in batches (``ReportPackReads``), off the reader's path.

What a read does, in one LMDB read transaction: the entry's meta, then per chunk a zero-copy
view into the map, copied once into the one buffer that is returned, and the copy checked
against the chunk's checksum (recorded by the catalog from bytes it had verified against
the revision's digest, as on the catalog's own reads; see ``catalog.cache.pack_cache``). So the
bytes returned are exactly the checked ones, and the transaction's snapshot keeps every page it
reads from reuse until it ends, whatever the catalog writes meanwhile. The returned buffer is
private and read-only; nothing references the map after the read (an engine may keep views
into the buffer for as long as it likes, and the lease ends at once). A reference entry (a
``file://`` store on the tier's filesystem, see ``catalog.cache.layout``) is read with no copy
at all: the store's immutable file is mapped read-only, every chunk checked on the map, and the
map returned (it outlives the file's unlinking by GC); the map is kept for the next read of the
same file (``catalog.client.mapped_files``), which checks every chunk again.

A chunk that fails its check is reported with the release; the catalog re-reads it, drops a bad
copy and refills it from the durable tier, and the read is tried once more; a second failure
is ``DataLoss``. Where the environment cannot be opened (another host, another mount
namespace, no permission on ``lock.mdb``, a different environment at that path), or the
catalog is in this very process (LMDB forbids opening one environment twice in a process), the
client uses the gRPC stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import lmdb

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.cache.chunk_reads import CorruptEntry, Tables, chunk_view, read_meta
from catalog.cache.layout import (
    CHUNKS_DB,
    ENTRIES_DB,
    INFO_DB,
    INSTANCE_KEY,
    EntryMeta,
    checksum,
    entry_key,
    host_id,
)
from catalog.client.errors import error_from_rpc, translated
from catalog.client.mapped_files import MappedFiles
from catalog.client.requests import TRANSFER_TIMEOUT
from catalog.convert import revision_from_pb
from catalog.digest import Digest
from catalog.errors import DataLoss, PermissionDenied, ResourceExhausted
from catalog.hostmem import new_buffer
from catalog.locks import ReadWriteLock
from catalog.model import Revision

if TYPE_CHECKING:
    _Txn = lmdb.Transaction[Any]

__all__ = [
    "ColocatedPath",
    "ColocatedReader",
    "CorruptChunk",
    "EntryMissing",
    "NotColocated",
    "open_reader",
]

log = logging.getLogger(__name__)
#: Unleased reads are reported this many seconds after the first of a batch ...
REPORT_DELAY_S = 0.5
#: ... or as soon as this many are waiting (the catalog takes at most 1024 per report).
REPORT_BATCH = 256
#: The thread that sends them ends after this many seconds with nothing to send (the next
#: unleased read starts it again).
REPORTER_IDLE_S = 60.0


class NotColocated(Exception):
    """The catalog's NVMe tier cannot be read from this process; the message says why."""


class EntryMissing(Exception):
    """The leased entry is not in the environment (the lease expired before the read)."""


class CorruptChunk(Exception):
    """A chunk failed its checksum; ``offset`` is its first byte in the pack."""

    def __init__(self, why: str, offset: int) -> None:
        super().__init__(why)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class CacheLocation:
    """What ``GetPackCacheLocation`` answered."""

    cache_dir: str
    instance_id: str
    host_id: str
    pid: int


class _SharedEnvironment:
    """One read-only LMDB environment per directory per process, shared by every reader.

    LMDB's locking breaks when one process opens an environment twice (closing either copy
    drops the process's locks on ``lock.mdb``), so every client of this process reads through
    the one handle, counted, and the last ``release`` closes it.
    """

    _lock = threading.Lock()
    _open: dict[str, _SharedEnvironment] = {}

    def __init__(self, path: str) -> None:
        self.path = path
        self.users = 0
        #: Transactions hold it shared; adopting a map the catalog grew holds it exclusively.
        self.gate = ReadWriteLock()
        self.env = lmdb.open(
            path,
            readonly=True,
            lock=True,
            create=False,
            max_dbs=4,
            max_readers=1024,
        )
        try:
            self.tables = Tables(
                self.env.open_db(CHUNKS_DB, create=False),
                self.env.open_db(ENTRIES_DB, create=False),
            )
            self.info = self.env.open_db(INFO_DB, create=False)
        except BaseException:
            self.env.close()
            raise

    @classmethod
    def acquire(cls, path: str) -> _SharedEnvironment:
        with cls._lock:
            shared = cls._open.get(path)
            if shared is None:
                shared = cls._open[path] = cls(path)
            shared.users += 1
            return shared

    def release(self) -> None:
        with _SharedEnvironment._lock:
            self.users -= 1
            if self.users == 0:
                del _SharedEnvironment._open[self.path]
                with self.gate.exclusive():
                    self.env.close()

    def begin(self) -> _Txn:
        """A read transaction with zero-copy values; the caller holds ``gate`` shared."""
        return self.env.begin(buffers=True)

    def adopt_grown_map(self) -> None:
        with self.gate.exclusive():
            self.env.set_mapsize(0)  # 0: take the size the writer set


def open_reader(location: CacheLocation) -> ColocatedReader:
    """A reader of the NVMe tier at ``location``, if this process can read it.

    Raises:
        NotColocated: another host, the catalog's own process, or an environment that cannot
            be opened read-only here or is not the one the catalog named.
    """
    if not location.cache_dir:
        raise NotColocated("the catalog runs without an NVMe tier")
    here = host_id()
    if location.host_id != here:
        raise NotColocated(f"the catalog runs on {location.host_id!r}, this is {here!r}")
    if location.pid == os.getpid():
        raise NotColocated("the catalog runs in this process (LMDB forbids a second handle)")
    path = os.path.realpath(location.cache_dir)
    if not Path(path, "data.mdb").is_file():
        raise NotColocated(f"no NVMe tier environment at {path} from here")
    try:
        shared = _SharedEnvironment.acquire(path)
    except (lmdb.Error, OSError) as exc:
        raise NotColocated(f"cannot open the NVMe tier at {path} read-only: {exc}") from None
    try:
        with shared.gate.shared(), shared.begin() as txn:
            instance = txn.get(INSTANCE_KEY, db=shared.info)
            found = None if instance is None else bytes(instance).decode(errors="replace")
    except lmdb.Error as exc:
        shared.release()
        raise NotColocated(f"cannot read the NVMe tier at {path}: {exc}") from None
    if found != location.instance_id:
        shared.release()
        raise NotColocated(
            f"the environment at {path} is {found!r}, not the catalog's {location.instance_id!r}"
        )
    return ColocatedReader(shared)


class ColocatedReader:
    """Reads whole packs from a catalog's NVMe tier in this process (see the module doc).

    Thread safe. ``close`` when done (the environment closes with its last reader).
    """

    def __init__(self, shared: _SharedEnvironment) -> None:
        self._shared = shared
        self._closed = False
        self.path = shared.path
        #: Store files of reference entries, kept mapped between reads (``mapped_files``).
        self.mapped = MappedFiles()

    def read(self, digest: Digest, size: int, name: str) -> memoryview:
        """The pack ``digest`` (``size`` bytes) as a private read-only buffer, every chunk
        checked against its checksum. The caller holds a lease on it.

        Raises:
            EntryMissing: no such entry (or one of another size).
            CorruptChunk: a chunk is missing, short or fails its checksum.
        """
        return self.read_entry(digest, size, name)[0]

    def read_entry(self, digest: Digest, size: int, name: str) -> tuple[memoryview, bool]:
        """As :meth:`read`, with whether the entry's meta records the pack's values checked
        finite by the catalog (``layout.FLAG_VALUES_FINITE``): then the bytes returned, which
        matched the meta's checksums, are the ones it checked.

        Raises:
            As :meth:`read`.
        """
        for attempt in range(2):
            try:
                with self._shared.gate.shared():
                    return self._read(digest, size, name)
            except lmdb.MapResizedError:
                if attempt:
                    raise
                self._shared.adopt_grown_map()  # the catalog grew its map since we opened
        raise AssertionError("unreachable")

    def _read(self, digest: Digest, size: int, name: str) -> tuple[memoryview, bool]:
        shared = self._shared
        ekey = entry_key(digest)
        with shared.begin() as txn:
            try:
                meta = read_meta(txn, shared.tables, ekey, name)
            except CorruptEntry as exc:
                raise CorruptChunk(f"{exc} (in {self.path})", 0) from None
            if meta is None:
                raise EntryMissing(f"{name} is not in the NVMe tier at {self.path}")
            if meta.size != size:
                raise EntryMissing(f"{name} is {meta.size} bytes in {self.path}, not {size}")
            if meta.file:
                return _map_referenced_file(self.mapped, meta, name), meta.values_finite
            buffer = new_buffer(size)
            out = memoryview(buffer)
            for index in range(meta.chunk_count):
                start = index * meta.chunk_bytes
                try:
                    view = chunk_view(txn, shared.tables, ekey, meta, index, name, b"")
                except CorruptEntry as exc:
                    raise CorruptChunk(str(exc), start) from None
                piece = out[start : start + len(view)]
                piece[:] = view
                # The copy is what is checked, so what is returned is exactly what matched.
                if checksum(piece, meta.fmt) != meta.checksum(index):
                    raise CorruptChunk(f"chunk {index} of {name} fails its checksum", start)
        return out.toreadonly(), meta.values_finite

    def close(self) -> None:
        """Stop using the environment. Idempotent."""
        if not self._closed:
            self._closed = True
            self.mapped.clear()
            self._shared.release()


def _map_referenced_file(mapped: MappedFiles, meta: EntryMeta, name: str) -> memoryview:
    """A reference entry's bytes: the durable tier's file mapped read-only (a map kept from an
    earlier read while the path names the same file, see ``mapped_files``), every chunk checked
    on the map, on every read; no copy at all. The file is immutable (written once under a
    temporary name and renamed into place) and a mapping outlives its unlinking (GC), so the
    view never changes. A map that fails a check is dropped, so the read after the catalog's
    repair maps the file afresh. (The checks on one thread: shared with a helper thread they
    made the attach ~0.5 ms slower on the busy 2-core machine, see docs/PERFORMANCE.md.)"""
    try:
        view = mapped.view(meta.file)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise CorruptChunk(f"the file of {name} ({meta.file}): {exc}", 0) from None
    if len(view) != meta.size:
        mapped.drop(meta.file)
        raise CorruptChunk(f"the file of {name} ({meta.file}) is {len(view)} bytes", 0)
    for index in range(meta.chunk_count):
        start = index * meta.chunk_bytes
        if checksum(view[start : start + meta.chunk_bytes], meta.fmt) != meta.checksum(index):
            mapped.drop(meta.file)
            raise CorruptChunk(f"chunk {index} of {name} fails its checksum", start)
    return view


class ColocatedPath:
    """The client's half of the colocated read path: decides once whether it applies, then
    reads whole packs under a lease. Used by :class:`catalog.client.CatalogClient`.

    ``stub`` is the client's ``CatalogStub``; ``target`` names the catalog in errors. Thread safe.
    """

    def __init__(self, stub: Any, target: str, *, timeout: float) -> None:
        self._stub = stub
        self._target = target
        self._timeout = timeout
        self._lock = threading.Lock()
        self._decided = False
        self._reader: ColocatedReader | None = None
        #: Why the colocated path is not used ("" while it is, or before the first fetch).
        self.reason = ""
        #: Lease releases and read reports sent and not answered yet (flush waits for them).
        self._in_flight: set[Any] = set()
        #: How long a lease lives unreleased (0: the catalog's default, 30 s).
        self.lease_ttl_s = 0.0
        #: Seconds an unleased read waits to be reported with the reads after it.
        self.report_delay_s = REPORT_DELAY_S
        self._unreported: list[str] = []
        self._first_unreported = 0.0  # when the oldest unreported read was queued (monotonic)
        # One thread sends the reports, kept between batches: starting a thread per batch
        # (a threading.Timer) cost an attach 0.3 ms (up to 3 ms) on the 2-core dev machine.
        self._report_wake = threading.Condition(self._lock)
        self._reporter: threading.Thread | None = None
        self._closing = False
        self._reports_refused = False  # a catalog without ReportPackReads
        #: Reads served from the NVMe tier (``unleased_reads`` of them without a lease: see
        #: ``fetch``), fallbacks to the stream, corrupt chunks reported.
        self.counters = {"reads": 0, "unleased_reads": 0, "fallbacks": 0, "corrupt_reported": 0}

    @property
    def active(self) -> bool:
        """Whether fetches read the NVMe tier directly (decides on first use)."""
        return self._ensure_reader() is not None

    def fetch(
        self, ref: str, known: Revision | None = None
    ) -> tuple[Revision, memoryview, bool] | None:
        """``ref``'s whole pack read from the NVMe tier under a lease, and whether the
        catalog checked its values finite (see ``ColocatedReader.read_entry``); ``None`` when
        this fetch must take the gRPC stream (not colocated, or the pack was not admitted to
        the tier, or its entry vanished).

        ``known``: the revision ``ref`` names, when the caller resolved it already (``ref``
        then names it by digest). The read then takes no lease at all: a pack already in the
        tier needs none to be read whole and checked (one LMDB read transaction keeps every
        page it reads from reuse, and a referenced store file is immutable). The read is
        reported to the catalog afterwards, batched with the reads of the next
        ``report_delay_s`` seconds in one ``ReportPackReads`` (its eviction policy and hints
        count it as they count a lease), so no RPC runs beside the attach that waits for the
        bytes. A pack that is not there yet, or whose read fails a check, goes the leased way
        below (the cold fill; the repair of a bad copy).

        Raises:
            As ``LeasePack`` (``NotFound``, ``InvalidReference``, ``DataLoss`` for a bad
            durable copy, ...); ``DataLoss`` when a chunk fails its check again after the
            catalog repaired it.
        """
        reader = self._ensure_reader()
        if reader is None:
            return None
        if known is not None:
            try:
                data, finite = reader.read_entry(
                    known.digest, known.size_bytes, f"{known.adapter}@{known.number}"
                )
            except (EntryMissing, CorruptChunk):
                pass  # decided under a lease below (a cold fill, or the repair)
            else:
                self._report_read(ref)
                self._count("reads")
                self._count("unleased_reads")
                return known, data, finite
        for attempt in range(2):
            try:
                with translated(self._target):
                    # it may wait for a cold pack's durable read, as a streamed fetch may
                    lease = self._stub.LeasePack(
                        pb.LeasePackRequest(ref=ref, ttl_s=self.lease_ttl_s),
                        timeout=TRANSFER_TIMEOUT,
                    )
            except ResourceExhausted as exc:  # not admitted to the tier: stream it
                log.debug("colocated fetch of %s falls back to the stream: %s", ref, exc)
                self._count("fallbacks")
                return None
            revision = revision_from_pb(lease.revision)
            name = f"{revision.adapter}@{revision.number}"
            try:
                data, finite = reader.read_entry(revision.digest, revision.size_bytes, name)
            except EntryMissing as exc:
                self._release(lease.lease_id, wait=False)
                log.warning("colocated fetch of %s falls back to the stream: %s", name, exc)
                self._count("fallbacks")
                return None
            except CorruptChunk as bad:
                self._count("corrupt_reported")
                # Synchronous: the catalog drops and refills the copy before we read again.
                self._release(lease.lease_id, wait=True, corrupt_offset=bad.offset)
                if attempt:
                    raise DataLoss(
                        f"fetch of {name} from the NVMe tier at {reader.path}: {bad} "
                        "(again after the catalog refilled it)"
                    ) from None
                log.warning("colocated fetch of %s: %s; the catalog refills it", name, bad)
                continue
            self._release(lease.lease_id, wait=False)
            self._count("reads")
            return revision, data, finite
        raise AssertionError("unreachable")

    def _report_read(self, ref: str) -> None:
        """Queue an unleased read of ``ref`` for the next ``ReportPackReads`` (sent after
        ``report_delay_s``, at ``REPORT_BATCH`` reads, or by ``flush``)."""
        with self._lock:
            if self._reports_refused:
                return
            if not self._unreported:
                self._first_unreported = time.monotonic()
            self._unreported.append(ref)
            if len(self._unreported) < REPORT_BATCH:
                if self._reporter is None and not self._closing:
                    self._reporter = threading.Thread(
                        target=self._report_loop, name="loracat-read-reports", daemon=True
                    )
                    self._reporter.start()
                self._report_wake.notify()
                return
        self.send_reports()

    def _report_loop(self) -> None:
        """The reporter thread: sends the queued reads once the oldest has waited
        ``report_delay_s``; ends after ``REPORTER_IDLE_S`` with none queued, or on close."""
        while True:
            with self._lock:
                idle_until = time.monotonic() + REPORTER_IDLE_S
                while not self._unreported:
                    left = idle_until - time.monotonic()
                    if self._closing or left <= 0:
                        self._reporter = None
                        return
                    self._report_wake.wait(left)
                while self._unreported and not self._closing:
                    left = self._first_unreported + self.report_delay_s - time.monotonic()
                    if left <= 0:
                        break
                    self._report_wake.wait(left)
            self.send_reports()

    def send_reports(self) -> None:
        """Send the unleased reads not reported yet, now (without waiting for the answer)."""
        with self._lock:
            batch, self._unreported = self._unreported, []
        if not batch:
            return
        try:
            future = self._stub.ReportPackReads.future(
                pb.ReportPackReadsRequest(refs=batch), timeout=self._timeout
            )
        except Exception as exc:  # a closed channel, say: the reads stay uncounted
            log.warning(
                "catalog %s: reporting %d pack reads failed: %s", self._target, len(batch), exc
            )
            return
        with self._lock:
            self._in_flight.add(future)  # so that flush and close wait for it too
        future.add_done_callback(self._reported)

    def _settled(self, future: Any) -> BaseException | None:
        """Forget a report or release that ended (``flush`` no longer waits for it); its
        error, or ``None`` when it succeeded or was cancelled."""
        with self._lock:
            self._in_flight.discard(future)
        if future.cancelled():
            return None
        error: BaseException | None = future.exception()
        return error

    def _reported(self, future: Any) -> None:
        error = self._settled(future)
        if error is None:
            return
        if isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.UNIMPLEMENTED:
            # A catalog older than the report: its policy does not see unleased reads.
            with self._lock:
                self._reports_refused = True
            log.info("catalog %s does not take pack read reports: %s", self._target, error)
            return
        log.warning("catalog %s: reporting pack reads failed: %s", self._target, error)

    def flush(self, timeout: float = 5.0) -> None:
        """Send the unleased reads not reported yet, and wait (up to ``timeout`` seconds) for
        the reports and lease releases still in flight."""
        self.send_reports()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._in_flight)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return
            for future in pending:
                # A failure is logged by the callback; an unreleased lease expires anyway.
                with contextlib.suppress(Exception):
                    future.result(timeout=max(0.0, left))
            time.sleep(0.001)  # a callback may still be registering its release

    def close(self) -> None:
        """Wait for pending releases and stop reading the NVMe tier. Idempotent."""
        self.flush()
        with self._lock:
            self._closing = True  # the reporter thread ends
            self._report_wake.notify_all()
            reader, self._reader = self._reader, None
            self._decided = True
            self.reason = self.reason or "closed"
        if reader is not None:
            reader.close()

    def _count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    def _ensure_reader(self) -> ColocatedReader | None:
        with self._lock:
            if self._decided:
                return self._reader
            try:
                answer = self._stub.GetPackCacheLocation(
                    pb.PackCacheLocationRequest(), timeout=self._timeout
                )
                self._reader = open_reader(
                    CacheLocation(answer.cache_dir, answer.instance_id, answer.host_id, answer.pid)
                )
            except NotColocated as exc:
                self.reason = str(exc)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, self._target)
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED or isinstance(
                    error, PermissionDenied
                ):  # an older catalog, or a token without the engine role
                    self.reason = f"the catalog does not offer its NVMe tier: {error}"
                else:
                    return None  # unreachable now (say): decide on a later fetch
            if self.reason:
                log.info("catalog %s: fetches use the gRPC stream: %s", self._target, self.reason)
            self._decided = True
            return self._reader

    def _release(self, lease_id: str, *, wait: bool, corrupt_offset: int | None = None) -> None:
        request = pb.ReleasePackLeaseRequest(lease_id=lease_id)
        if corrupt_offset is not None:
            request.corrupt_offset = corrupt_offset
        if wait:
            with translated(self._target):
                self._stub.ReleasePackLease(request, timeout=TRANSFER_TIMEOUT)
            return
        # Off the fetch's path: the bytes are ours already, and an unreleased lease expires.
        future = self._stub.ReleasePackLease.future(request, timeout=self._timeout)
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(self._released)

    def _released(self, future: Any) -> None:
        error = self._settled(future)
        if error is not None:
            log.warning("catalog %s: releasing a pack lease failed: %s", self._target, error)
