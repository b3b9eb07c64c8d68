"""Maintenance of the catalog: GC of pack blobs, verify, log replay, checkpoints and reindex.

Mixed into ``catalog.core.Catalog``. None of these writes an event: the durable log is only read
(``verify``, ``replay_into``, ``reindex``) or folded into a checkpoint beside it
(``checkpoint``), and ``gc`` deletes only blobs no live revision, intent or push in flight names.

Locking: ``gc`` decides and deletes under the index lock (shared) and the blob guard a push takes
around writing its blob, so a blob is never deleted under a push about to name it. ``reindex``
builds the fresh index with no lock held and takes the index lock exclusively only to swap the
directories; a crash inside the swap leaves the old index under its ``.old`` name, which
:meth:`Maintenance._restore_interrupted_swap` (run when the catalog opens) puts back.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from catalog.cache.pack_cache import PackCache
from catalog.catalog_parts import CatalogParts
from catalog.checkpoint import CheckpointInfo, load_log, verify_checkpoints, write_checkpoint
from catalog.digest import Digest
from catalog.errors import DataLoss, FailedPrecondition
from catalog.events import BLOB_PREFIX, LOG_PREFIX, Event, blob_key, parse_blob_key
from catalog.index.base import RevisionIndex
from catalog.storage.base import BlobStore

log = logging.getLogger(__name__)

#: Opens (creating if need be) the index kept in a directory.
IndexOpener = Callable[[Path], RevisionIndex]
#: Log objects fetched per ``get_many`` while verifying.
REPLAY_BATCH = 2000


class Maintenance(CatalogParts):
    """``gc``, ``verify``, ``replay_into``, ``checkpoint`` and ``reindex`` of the catalog."""

    store: BlobStore
    pack_cache: PackCache | None
    index_path: Path
    _open_index: IndexOpener
    #: Held by a push around writing a blob and by ``gc`` around deciding and deleting.
    _blob_guard: threading.Lock
    #: Digests whose blob a push is writing right now (under ``_blob_guard``).
    _inflight: Counter[Digest]

    def gc(self, *, dry_run: bool = False) -> tuple[list[Digest], int, int]:
        """Delete pack blobs no live revision references.

        Returns ``(deleted digests, freed bytes, kept blobs)``. Blobs of pushes in flight and of
        recorded intents are kept. Holding the blob guard while deciding and deleting means a
        concurrent push either registered its digest first (kept) or starts after the delete and
        writes the blob again.
        """
        deleted: list[Digest] = []
        freed = 0
        kept = 0
        with self._swap.shared(), self._blob_guard:
            protected = set(self._inflight)
            protected.update(e.digest for e in self.index.intents() if e.digest is not None)
            for key in list(self.store.list(BLOB_PREFIX)):
                digest = parse_blob_key(key)
                if digest in protected or self.index.digest_refcount(digest) > 0:
                    kept += 1
                    continue
                size = self.store.size(key) or 0
                if not dry_run:
                    self.store.delete(key)
                    self._drop_from_cache(digest)
                deleted.append(digest)
                freed += size
        return deleted, freed, kept

    def _drop_from_cache(self, digest: Digest) -> None:
        cache = self.pack_cache
        if cache is None or not cache.contains(digest):
            return
        for entry in cache.entries():
            if entry.digest == digest:
                for _ in range(entry.pins):
                    cache.unpin(digest)
        try:
            cache.evict(digest)
        except FailedPrecondition as exc:
            # Leased by a colocated engine reading it right now: the policy evicts it later
            # (nothing resolves to an unreferenced digest, so nobody asks for it again).
            log.info("gc left %s in the NVMe tier for now: %s", digest, exc)

    def verify(self) -> tuple[int, int, list[str]]:
        """Check every log event decodes and every referenced blob exists and hashes right.

        Returns ``(blobs checked, events checked, problems)``; each problem is one line.
        """
        problems: list[str] = []
        events = 0
        for key, data in self._iter_log_objects():
            events += 1
            if data is None:
                problems.append(f"log object {key} vanished while verifying")
                continue
            try:
                Event.decode(data, key=key)
            except DataLoss as exc:
                problems.append(str(exc))
        blobs = 0
        with self._swap.shared():
            digests = [d for d, _ in self.index.referenced_digests()]
        for digest in digests:
            blobs += 1
            data = self.store.get(blob_key(digest))
            if data is None:
                problems.append(f"blob {digest} is referenced but missing from {self.store.url}")
            elif Digest.of(data, digest.algorithm) != digest:
                problems.append(f"blob {digest} is corrupt in {self.store.url}")
        problems.extend(verify_checkpoints(self.store))
        if self.pack_cache is not None:
            report = self.pack_cache.verify()
            blobs += report.checked
            problems.extend(
                f"NVMe cache copy of {item} was corrupt and has been dropped"
                for item in report.corrupt
            )
        return blobs, events, problems

    def _iter_log_objects(self) -> Iterator[tuple[str, bytes | None]]:
        keys = sorted(self.store.list(LOG_PREFIX))
        for start in range(0, len(keys), REPLAY_BATCH):
            batch = keys[start : start + REPLAY_BATCH]
            fetched = self.store.get_many(batch)
            for key in batch:
                yield key, fetched.get(key)

    def replay_into(self, index: RevisionIndex) -> int:
        """Apply the whole durable log to ``index`` (empty) in each adapter's order: the newest
        valid checkpoint plus the log objects written after it (``catalog.checkpoint``)."""
        return index.apply_many(load_log(self.store))

    def checkpoint(self, *, keep: int = 2) -> CheckpointInfo:
        """Write a log checkpoint so the next rebuild reads one object plus the tail."""
        return write_checkpoint(self.store, keep=keep)

    def reindex(self) -> tuple[int, int, int, float]:
        """Rebuild the index from the durable tier alone and swap it in.

        Returns ``(adapters, revisions, events, seconds)``. Writers wait during the swap only.
        """
        started = time.perf_counter()
        fresh_path = self.index_path.with_name(self.index_path.name + ".reindex")
        shutil.rmtree(fresh_path, ignore_errors=True)
        fresh = self._open_index(fresh_path)
        try:
            events = self.replay_into(fresh)
        except BaseException:
            fresh.close()
            shutil.rmtree(fresh_path, ignore_errors=True)
            raise
        fresh.close()
        old_path = self.index_path.with_name(self.index_path.name + ".old")
        with self._swap.exclusive():
            self.index.close()
            shutil.rmtree(old_path, ignore_errors=True)
            os.replace(self.index_path, old_path)
            os.replace(fresh_path, self.index_path)
            self.index = self._open_index(self.index_path)
            shutil.rmtree(old_path, ignore_errors=True)
            counts = self.index.counts()
        return (
            int(counts.get("adapters", 0)),
            int(counts.get("revisions", 0)),
            events,
            time.perf_counter() - started,
        )

    def _restore_interrupted_swap(self) -> None:
        old_path = self.index_path.with_name(self.index_path.name + ".old")
        if not self.index_path.exists() and old_path.exists():
            os.replace(old_path, self.index_path)  # died between the renames
        else:  # died after both (or this is an older run's): the index in place is whole
            shutil.rmtree(old_path, ignore_errors=True)
        shutil.rmtree(
            self.index_path.with_name(self.index_path.name + ".reindex"), ignore_errors=True
        )
