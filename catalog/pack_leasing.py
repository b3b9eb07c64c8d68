"""Pack leases of the catalog: the control half of the colocated read path.

Mixed into ``catalog.core.Catalog``. An engine on the catalog's host reads pack bytes straight
from the NVMe tier (``catalog.client.colocated``) and asks the catalog only for where the tier
is (:meth:`PackLeasing.pack_cache_location`) and for a lease per read
(:meth:`PackLeasing.lease_pack`, :meth:`PackLeasing.release_pack_lease`); see
``catalog.cache.leases`` for what a lease guarantees. A read of a revision the engine had
resolved, found whole in the tier, needs no lease (see ``catalog.client.colocated``): the
engine reports such reads in batches (:meth:`PackLeasing.report_pack_reads`), so that the
tier's policy and the hints see them as they see leased reads.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from catalog.cache.layout import host_id
from catalog.cache.leases import PackLease, PackLeases
from catalog.cache.pack_cache import PackCache
from catalog.errors import InvalidArgument, NotFound, ResourceExhausted
from catalog.hints import HintBroker
from catalog.model import Ref, Revision

#: Most reads one ``report_pack_reads`` takes (a client sends larger batches in parts).
MAX_REPORTED_READS = 1024


@dataclass(frozen=True, slots=True)
class PackCacheLocation:
    """Where a colocated reader finds the NVMe tier: ``cache_dir`` on host ``host_id``, whose
    environment holds ``instance_id``; ``pid`` is the catalog's process (a reader in that very
    process must not open the environment a second time: LMDB forbids it)."""

    cache_dir: str
    instance_id: str
    host_id: str
    pid: int


class PackLeasing:
    """``lease_pack``, ``release_pack_lease`` and ``pack_cache_location`` of the catalog."""

    pack_cache: PackCache | None
    hints: HintBroker
    counters: Counter[str]
    resolve: Callable[[Ref | str], Revision]
    _read_durable: Callable[[Revision], bytes]
    _require_cache: Callable[[], PackCache]
    leases: PackLeases | None

    def _open_leases(self) -> None:
        self.leases = None if self.pack_cache is None else PackLeases(self.pack_cache)

    def _close_leases(self) -> None:
        if self.leases is not None:
            self.leases.close()

    def pack_cache_location(self) -> PackCacheLocation | None:
        """Where this catalog's NVMe tier is; ``None`` when it runs without one."""
        cache = self.pack_cache
        if cache is None:
            return None
        return PackCacheLocation(
            str(cache.path.resolve()), cache.instance_id, host_id(), os.getpid()
        )

    def lease_pack(self, ref: Ref | str, *, ttl_s: float = 0.0) -> tuple[Revision, PackLease]:
        """Resolve ``ref``, make sure its pack is in the NVMe tier (one durable read however
        many engines ask at once) and keep it there, unevicted and unrewritten, until the
        lease is released or ``ttl_s`` (0: the default) runs out.

        Raises:
            FailedPrecondition: this catalog runs without an NVMe tier.
            ResourceExhausted: the tier's policy did not admit the pack, or too many leases
                are alive (read it over ``FetchPack`` instead).
            InvalidArgument: a bad ``ttl_s``.
            As ``resolve``; ``DataLoss`` when the durable copy is missing or corrupt.
        """
        cache = self._require_cache()
        leases = self.leases
        if leases is None:  # only without a cache, which _require_cache refused
            raise InvalidArgument("this catalog grants no pack leases")
        revision = self.resolve(ref)
        name = f"{revision.adapter}@{revision.number}"
        self.counters["pack_leases"] += 1
        self.hints.record_demand(name, str(revision.digest), revision.base_id)
        lease = leases.grant(
            revision.digest,
            lambda: self._read_durable(revision),
            name_for_errors=name,
            size_bytes=revision.size_bytes,
            ttl_s=ttl_s,
        )
        if lease is None:
            raise ResourceExhausted(
                f"the pack of {name} ({revision.size_bytes} bytes) was not admitted to the NVMe "
                f"tier at {cache.path}; read it over FetchPack"
            )
        return revision, lease

    def report_pack_reads(self, refs: Sequence[str]) -> int:
        """Record reads a colocated engine made without a lease (a revision it had resolved,
        read whole from the tier and checked): each is an access of the pack for the tier's
        policy and demand for hints, as ``lease_pack`` records them. A ref that no longer
        resolves, or whose pack left the tier since, is skipped. Returns how many were
        recorded.

        Raises:
            FailedPrecondition: this catalog runs without an NVMe tier.
            InvalidArgument: more than ``MAX_REPORTED_READS`` refs.
        """
        cache = self._require_cache()
        if len(refs) > MAX_REPORTED_READS:
            raise InvalidArgument(f"at most {MAX_REPORTED_READS} reads per report, got {len(refs)}")
        recorded = 0
        for ref in refs:
            try:
                revision = self.resolve(ref)
            except (NotFound, InvalidArgument):  # deleted since, or not a ref: nothing to count
                self.counters["pack_reads_ignored"] += 1
                continue
            self.hints.record_demand(
                f"{revision.adapter}@{revision.number}", str(revision.digest), revision.base_id
            )
            if cache.record_read(revision.digest):
                recorded += 1
            else:
                self.counters["pack_reads_ignored"] += 1
        self.counters["pack_reads_reported"] += recorded
        return recorded

    def release_pack_lease(self, lease_id: str, *, corrupt_offset: int = -1) -> bool:
        """End a lease; ``False`` when it had already expired (or never existed).

        ``corrupt_offset`` >= 0 reports that the reader found the chunk holding that byte
        failing its checksum: the catalog reads that chunk itself, and a copy that fails there
        too is dropped and loaded again from the durable tier (the reader then leases it again).
        A report on a lease that is gone is ignored.

        Raises:
            InvalidArgument: an empty lease id.
            DataLoss: the durable copy is missing or corrupt too.
        """
        if not lease_id:
            raise InvalidArgument("release_pack_lease needs a lease id")
        leases = self.leases
        lease = None if leases is None else leases.release(lease_id)
        if lease is None:
            return False
        if corrupt_offset >= 0:
            self.counters["pack_lease_corrupt_reports"] += 1
            cache = self._require_cache()
            # A ranged read checks the chunk against its checksum; a bad copy is dropped there
            # and the read falls through to the loader, which refills the tier.
            cache.read_range(
                lease.digest,
                min(corrupt_offset, max(0, lease.size_bytes - 1)),
                1,
                lease.loader,
                name_for_errors=lease.name,
            )
        return True
