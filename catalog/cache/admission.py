"""Admission of a pack to the NVMe tier by its writer: a push puts what it just committed in
the tier, so the first attach of a new revision is a tier hit instead of a cold fill.

A cold fill reads the durable copy back, hashes it against its digest, checks its values
finite and takes its chunk checksums. A push has done the first three already on the bytes it
is committing (``catalog.push_upload``), so admitting them costs the chunk checksums (XXH3-128,
~1 ms for 16.8 MB) and one small LMDB commit (a reference entry when the ``file://`` store's
file is on the tier's filesystem, as a cold fill would record).

The admission goes through the tier's single flight: a reader that asks for the digest
meanwhile waits for it and then reads the entry (or loads itself, when the policy did not
admit the pack). It is counted on its own (``admitted_at_push``), not as a miss or a load, so
the tier's hit and miss counts stay those of requests. The eviction policy decides as for any
fill: an admitted pack may evict others, and one larger than the tier is not admitted.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import cast

import lmdb

from catalog.cache.cache_state import PackCacheState
from catalog.cache.layout import EntryMeta
from catalog.digest import Digest
from catalog.errors import CatalogError

log = logging.getLogger(__name__)


class AdmissionMixin(PackCacheState):
    """:meth:`admit_verified`, mixed into :class:`~catalog.cache.pack_cache.PackCache`."""

    def admit_verified(
        self,
        digest: Digest,
        data: bytes | memoryview,
        *,
        values_finite: bool,
        name_for_errors: str,
        checksums: tuple[int, bytes] | None = None,
    ) -> bool:
        """Cache ``data``, which the caller has just verified against ``digest`` (and, with
        ``values_finite``, checked finite), as a fill would, unless the pack is cached or being
        loaded already. Returns whether it is cached by this call; ``False`` also when the
        policy did not admit it. ``data`` is only read during the call. ``checksums``: the
        chunk size and the chunks' checksums (``catalog.cache.layout.checksum``), when the
        caller took them already from the same bytes; used when the size is this cache's.

        A failure to write the cache is logged and counted (``fill_failures``), never raised:
        the caller's bytes are committed elsewhere whatever happens here.

        Raises:
            FailedPrecondition: the cache is closed.
        """
        self._check_open()
        key = str(digest)
        with self._lock:
            if key in self._inflight or key in self._policy:
                return False
            flight: Future[bytes] = Future()
            self._inflight[key] = flight
        admitted = False
        try:
            as_bytes = cast(bytes, data)  # read through memoryview(), as bytes would be
            file = self._reference_for(digest, as_bytes)
            taken = checksums[1] if checksums and checksums[0] == self.chunk_bytes else None
            meta = EntryMeta.for_data(
                as_bytes, self.chunk_bytes, file=file, values_finite=values_finite, checksums=taken
            )
            self._install(digest, as_bytes, meta)
            with self._lock:
                admitted = key in self._policy
        except (lmdb.Error, CatalogError) as exc:
            log.warning(
                "pack cache %s: admitting %s (%s) failed: %s", self.path, name_for_errors, key, exc
            )
            with self._lock:
                self._counters.fill_failures += 1
        finally:
            with self._lock:
                del self._inflight[key]
                self._counters.admitted_at_push += admitted
            # No bytes for the waiters: they read the entry now cached, or load it themselves.
            flight.set_result(cast(bytes, None))
        return admitted
