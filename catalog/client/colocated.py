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

A chunk that fails its check is reported with the release; the catalog re-reads it, drops a bad
copy and refills it from the durable tier, and the read is tried once more; a second failure
is ``DataLoss``. Where the environment cannot be opened (another host, another mount
namespace, no permission on ``lock.mdb``, a different environment at that path), or the
catalog is in this very process (LMDB forbids opening one environment twice in a process), the
client uses the gRPC stream.

This module owns that protocol: whether the path applies (decided once), leases, the unleased
read and when a read falls back, is retried or is ``DataLoss``, and the counters. Its parts,
one job each: ``tier_environment`` (opening and checking the tier read-only, the one LMDB handle
per process), ``tier_reader`` (the read itself: every chunk checked on every read),
``mapped_files`` (kept maps of referenced store files), ``read_reports`` (the batched reports
of unleased reads) and ``pending_calls`` (the releases and reports ``flush`` waits for). The
names they define that callers use are importable from here too.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.client.errors import error_from_rpc, translated
from catalog.client.pending_calls import PendingCalls
from catalog.client.read_reports import REPORT_BATCH, REPORT_DELAY_S, REPORTER_IDLE_S, ReadReports
from catalog.client.requests import TRANSFER_TIMEOUT
from catalog.client.tier_environment import CacheLocation, NotColocated
from catalog.client.tier_reader import ColocatedReader, CorruptChunk, EntryMissing, open_reader
from catalog.convert import revision_from_pb
from catalog.errors import DataLoss, PermissionDenied, ResourceExhausted
from catalog.model import Revision

__all__ = [
    "REPORTER_IDLE_S",
    "REPORT_BATCH",
    "REPORT_DELAY_S",
    "CacheLocation",
    "ColocatedPath",
    "ColocatedReader",
    "CorruptChunk",
    "EntryMissing",
    "NotColocated",
    "open_reader",
]

log = logging.getLogger(__name__)


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
        self._pending = PendingCalls()
        #: How long a lease lives unreleased (0: the catalog's default, 30 s).
        self.lease_ttl_s = 0.0
        #: The unleased reads not reported yet, and the thread that reports them.
        self.read_reports = ReadReports(self._send_report, self._pending, target)
        #: Reads served from the NVMe tier (``unleased_reads`` of them without a lease: see
        #: ``fetch``), fallbacks to the stream, corrupt chunks reported.
        self.counters = {"reads": 0, "unleased_reads": 0, "fallbacks": 0, "corrupt_reported": 0}

    @property
    def report_delay_s(self) -> float:
        """Seconds an unleased read waits to be reported with the reads after it."""
        return self.read_reports.delay_s

    @report_delay_s.setter
    def report_delay_s(self, seconds: float) -> None:
        self.read_reports.delay_s = seconds

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
                self.read_reports.add(ref)
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

    def send_reports(self) -> None:
        """Send the unleased reads not reported yet, now (without waiting for the answer)."""
        self.read_reports.send()

    def _send_report(self, refs: list[str]) -> Any:
        """One ``ReportPackReads`` of ``refs``, sent; its future (``read_reports``' sender)."""
        return self._stub.ReportPackReads.future(
            pb.ReportPackReadsRequest(refs=refs), timeout=self._timeout
        )

    def flush(self, timeout: float = 5.0) -> None:
        """Send the unleased reads not reported yet, and wait (up to ``timeout`` seconds) for
        the reports and lease releases still in flight."""
        self.send_reports()
        self._pending.wait(timeout)

    def close(self) -> None:
        """Wait for pending releases and stop reading the NVMe tier. Idempotent."""
        self.flush()
        self.read_reports.close()  # the reporter thread ends
        with self._lock:
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
        self._pending.add(future, self._release_failed)

    def _release_failed(self, error: BaseException) -> None:
        log.warning("catalog %s: releasing a pack lease failed: %s", self._target, error)
