"""Pack reads of the catalog: verified bytes of a revision's pack, through the NVMe tier.

Mixed into ``catalog.core.Catalog``. Every read checks the bytes it hands out: a durable read
against the revision's digest, an NVMe tier hit against the per-chunk checksums taken when the
pack was admitted (which happened only after its durable bytes matched the digest; see
``catalog.cache.pack_cache``). Also the tier's own operations (pin, unpin, evict, prefetch),
each by reference.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from catalog.cache.pack_cache import PackCache
from catalog.digest import Digest
from catalog.errors import DataLoss, FailedPrecondition, InvalidArgument
from catalog.events import blob_key
from catalog.hints import HintBroker
from catalog.model import PrefetchProgress, Ref, Revision
from catalog.prefetch import PrefetchQueue
from catalog.storage.base import BlobStore


@dataclass(frozen=True)
class DeferredPackRead:
    """A pack read whose digest check and NVMe tier fill are the caller's to run
    (``Catalog.read_pack_bytes_deferred``): ``verify`` (raises ``DataLoss``) before the bytes
    count as the revision's, ``fill`` after; both ``None`` when the bytes came checked."""

    data: bytes
    verify: Callable[[], None] | None
    fill: Callable[[], object] | None


class PackReads:
    """``read_pack_bytes`` and its variants, ``fetch``, and the NVMe tier's operations."""

    pack_cache: PackCache | None
    store: BlobStore
    hints: HintBroker
    counters: Counter[str]
    prefetcher: PrefetchQueue
    resolve: Callable[[Ref | str], Revision]

    def read_pack_bytes(self, revision: Revision) -> bytes:
        """The verified pack bytes of ``revision``, through the NVMe tier when there is one.

        Raises ``DataLoss`` naming the revision when the durable blob is missing or its bytes
        do not hash to the revision's digest.
        """
        return self.read_pack_range(revision, 0, revision.size_bytes)

    def read_pack_range(self, revision: Revision, offset: int, length: int) -> bytes:
        """``length`` verified bytes of ``revision``'s pack from ``offset`` (fewer at its end).

        Raises ``InvalidArgument`` for an offset beyond the pack, ``DataLoss`` as above.
        """
        self._start_pack_read(revision, offset, length)
        if self.pack_cache is None:
            data = self._read_durable(revision)
            self.counters["durable_bytes_read"] += len(data)
            return data if (offset, length) == (0, len(data)) else data[offset : offset + length]
        # Hits are checked against per-chunk checksums taken when the pack was admitted, which
        # happened only after the durable bytes matched the digest (see catalog.cache.pack_cache).
        return self.pack_cache.read_range(
            revision.digest,
            offset,
            length,
            lambda: self._read_durable(revision),
            name_for_errors=f"{revision.adapter}@{revision.number}",
        )

    def read_pack_bytes_deferred(self, revision: Revision) -> DeferredPackRead:
        """:meth:`read_pack_bytes` for a caller that should wait for as little as possible: on
        an NVMe tier miss, the durable bytes as they arrive, with their digest check and the
        tier's fill (of those very bytes, no second durable read) left to the caller, which
        runs the check beside its own work on the bytes and the fill after it has answered.
        A fill commits the pack's chunks in one synced LMDB write transaction, which costs
        about as much as the durable read; the digest check of a 2.4 MB pack ~2 ms of sha256.
        A hit (or a catalog without a tier) is read and checked as :meth:`read_pack_bytes`.
        ``ExportPeftDir`` uses this: an engine's cold first request is waiting on it.

        Raises ``DataLoss`` as :meth:`read_pack_bytes` (a missing durable copy here, a corrupt
        one from ``verify``); the fill raises what ``PackCache.read_through`` raises
        (``FailedPrecondition`` once the tier is closed).
        """
        cache = self.pack_cache
        if cache is None or cache.contains(revision.digest):
            return DeferredPackRead(self.read_pack_bytes(revision), None, None)
        self._start_pack_read(revision, 0, revision.size_bytes)
        data = self._get_durable(revision)
        self.counters["durable_bytes_read"] += len(data)
        name = f"{revision.adapter}@{revision.number}"
        return DeferredPackRead(
            data,
            lambda: self._verify_durable(revision, data),
            lambda: cache.read_through(revision.digest, lambda: data, name_for_errors=name),
        )

    def iter_pack_range(
        self, revision: Revision, offset: int, length: int, piece_bytes: int
    ) -> Iterator[bytes]:
        """:meth:`read_pack_range` in pieces of at most ``piece_bytes``, for streaming a range
        out (``FetchPack``): the same checks, counters and demand record, but a range the NVMe
        tier serves is read, checked and handed over one cache chunk at a time instead of being
        assembled in memory first (see ``PackCache.iter_range``).

        Raises ``InvalidArgument`` (when called) for a range outside the pack; ``DataLoss`` as
        :meth:`read_pack_range` (without the NVMe tier when called, with it while iterating).
        """
        self._start_pack_read(revision, offset, length)
        if self.pack_cache is None:
            data = self._read_durable(revision)
            self.counters["durable_bytes_read"] += len(data)
            view = memoryview(data)[offset : offset + length]
            return (bytes(view[at : at + piece_bytes]) for at in range(0, len(view), piece_bytes))
        return self.pack_cache.iter_range(
            revision.digest,
            offset,
            length,
            lambda: self._read_durable(revision),
            name_for_errors=f"{revision.adapter}@{revision.number}",
            piece_bytes=piece_bytes,
        )

    def _start_pack_read(self, revision: Revision, offset: int, length: int) -> None:
        """Check a range of ``revision``'s pack, count the read and record the demand."""
        if offset < 0 or length < 0 or offset > revision.size_bytes:
            raise InvalidArgument(
                f"range {offset}+{length} is outside the {revision.size_bytes}-byte pack"
            )
        self.counters["pack_reads"] += 1
        self.hints.record_demand(
            f"{revision.adapter}@{revision.number}", str(revision.digest), revision.base_id
        )

    def _read_durable(self, revision: Revision) -> bytes:
        data = self._get_durable(revision)
        self._verify_durable(revision, data)
        return data

    def _get_durable(self, revision: Revision) -> bytes:
        data = self.store.get(blob_key(revision.digest))
        if data is None:
            raise DataLoss(
                f"pack of {revision.adapter}@{revision.number} ({revision.digest}) is missing "
                f"from the durable store {self.store.url}"
            )
        return data

    def _verify_durable(self, revision: Revision, data: bytes) -> None:
        actual = Digest.of(data, revision.digest.algorithm)
        if actual != revision.digest:
            raise DataLoss(
                f"pack of {revision.adapter}@{revision.number} is corrupt in the durable store: "
                f"expected {revision.digest}, bytes hash to {actual}"
            )
        self.counters["durable_reads"] += 1

    # -- the NVMe tier ----------------------------------------------------------------------

    def _require_cache(self) -> PackCache:
        if self.pack_cache is None:
            raise FailedPrecondition("this catalog runs without an NVMe pack cache")
        return self.pack_cache

    def _warm(self, ref: str) -> tuple[str, int]:
        revision = self.resolve(ref)
        if self.pack_cache is not None and self.pack_cache.contains(revision.digest):
            return str(revision.digest), revision.size_bytes
        self.read_pack_bytes(revision)
        return str(revision.digest), revision.size_bytes

    def prefetch(
        self, refs: list[str], *, priority: int = 0, deadline_s: float = 0.0
    ) -> Iterator[PrefetchProgress]:
        """Warm the NVMe tier for ``refs``; yields one progress record per reference.

        Higher ``priority`` goes first across all callers; references not started within
        ``deadline_s`` (> 0) are cancelled. Bad references are reported as ``failed``.
        Raises ``InvalidArgument`` (empty or oversized request).
        """
        return self.prefetcher.submit(list(refs), priority=priority, deadline_s=deadline_s)

    def pin_pack(self, ref: Ref | str) -> Revision:
        """Load ``ref``'s pack into the NVMe tier and keep it there until unpinned."""
        cache = self._require_cache()
        revision = self.resolve(ref)
        cache.pin(
            revision.digest,
            lambda: self._read_durable(revision),
            name_for_errors=f"{revision.adapter}@{revision.number}",
        )
        return revision

    def unpin_pack(self, ref: Ref | str) -> Revision:
        """Drop one pin of ``ref``'s pack. Raises ``NotFound``, ``FailedPrecondition``."""
        revision = self.resolve(ref)
        self._require_cache().unpin(revision.digest)
        return revision

    def evict_pack(self, ref: Ref | str) -> Revision:
        """Remove ``ref``'s pack from the NVMe tier (not from the durable store)."""
        revision = self.resolve(ref)
        self._require_cache().evict(revision.digest)
        return revision

    def fetch(self, ref: Ref | str) -> tuple[Revision, bytes]:
        """Resolve ``ref`` and return its verified pack. Raises as resolve and read_pack_bytes."""
        revision = self.resolve(ref)
        return revision, self.read_pack_bytes(revision)
