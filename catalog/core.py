"""The catalog core: lifecycle and recovery, the write path and pushes, reads, stats.

It composes a durable :class:`~catalog.storage.BlobStore` (the source of truth) with a
:class:`~catalog.index.base.RevisionIndex` (derived state). Every change follows one path,
:meth:`Catalog._append`: record an intent in the index, write the event to the durable log with a
conditional put, then apply it to the index. A crash between any two steps leaves either nothing
visible or an event that :meth:`Catalog.recover` (run at start) applies; packs are written before
the event that names them, so no visible revision ever lacks its bytes.

The core knows nothing of gRPC or protobuf; the service is a thin layer over it. Its seams live
in modules of their own, mixed into :class:`Catalog`: ``catalog.push_upload`` (a push in
progress, limits), ``catalog.alias_moves`` (alias moves, rollback), ``catalog.revision_metadata``
(metadata edits), ``catalog.revision_deletes`` (deletes of revisions), ``catalog.name_purge``
(purge of deleted names), ``catalog.maintenance`` (GC, verify, log replay, checkpoints,
reindex), ``catalog.pack_reads`` (verified pack reads through the NVMe tier, pins, prefetch),
``catalog.pack_leasing`` (leases for colocated readers) and ``catalog.engines`` (engine
registration, residency, hint streams).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from catalog.alias_moves import AliasMoves
from catalog.cache.pack_cache import PackCache
from catalog.digest import DEFAULT_ALGORITHM, HASHERS, Digest
from catalog.engines import ENGINE_TIER_FIELDS, ENGINE_TIERS, EngineRecord, EngineRegistry
from catalog.errors import (
    CatalogError,
    Conflict,
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from catalog.events import LOG_PREFIX, Event, blob_key, log_key
from catalog.hints import HintBroker
from catalog.identity import caller
from catalog.index.base import DEFAULT_PAGE_SIZE
from catalog.index.rules import check_alias_name
from catalog.intents import IntentSettler, settle_earlier_intents, settle_intent
from catalog.locks import KeyedLocks, ReadWriteLock
from catalog.maintenance import IndexOpener, Maintenance
from catalog.model import (
    AdapterName,
    AdapterSummary,
    AliasMove,
    Page,
    PushProvenance,
    Ref,
    Revision,
    Selector,
    check_part,
)
from catalog.name_purge import NamePurge
from catalog.pack_leasing import PackLeasing
from catalog.pack_reads import PackReads
from catalog.prefetch import PrefetchQueue
from catalog.push_upload import Limits, PushUpload
from catalog.revision_deletes import RevisionDeletes
from catalog.revision_metadata import (
    ANONYMOUS,
    MetadataEdits,
    Provenance,
    check_metadata,
    check_user_keys,
)
from catalog.spool import PushSpool
from catalog.storage.base import BlobStore

log = logging.getLogger(__name__)


class Catalog(
    AliasMoves,
    MetadataEdits,
    RevisionDeletes,
    NamePurge,
    Maintenance,
    EngineRegistry,
    PackReads,
    PackLeasing,
):
    """The catalog over one durable store and one index. Thread-safe.

    Every public method documents what it raises; all errors derive from ``CatalogError``.
    """

    def __init__(
        self,
        store: BlobStore,
        index_path: Path,
        open_index: IndexOpener,
        *,
        spool_dir: Path | None = None,
        limits: Limits | None = None,
        on_close: Callable[[], None] | None = None,
        pack_cache: PackCache | None = None,
        prefetch_workers: int = 4,
        attach_aliases: tuple[str, ...] = ("serving",),
        digest_algorithm: str = DEFAULT_ALGORITHM,
    ) -> None:
        if digest_algorithm not in HASHERS:
            raise InvalidArgument(
                f"unknown digest algorithm {digest_algorithm!r}; one of {', '.join(HASHERS)}"
            )
        #: What new revisions are identified by (existing ones keep theirs). Every read of pack
        #: bytes is checked against it, so a faster hash (blake3) shows on the fetch path.
        self.digest_algorithm = digest_algorithm
        self.store = store
        self._on_close = on_close
        #: The NVMe tier; ``None`` reads every pack from the durable store.
        self.pack_cache = pack_cache
        self._open_leases()  # leases on NVMe entries for colocated engines (pack_leasing)
        self.hints = HintBroker()
        self.attach_aliases = attach_aliases
        self.counters: Counter[str] = Counter()
        self.index_path = Path(index_path)
        self._open_index = open_index
        self.limits = limits or Limits()
        self.spool_dir = Path(spool_dir) if spool_dir else self.index_path.parent / "spool"
        #: Pushes in flight: swept of what a crash left, bounded in bytes (``catalog.spool``).
        self.spool = PushSpool(self.spool_dir, self.limits.max_spool_bytes)
        self.spool.sweep()
        self._swap = ReadWriteLock()
        self._adapter_locks = KeyedLocks()
        # Digests whose blob a push is writing right now; GC must not delete them.
        self._blob_guard = threading.Lock()
        self._inflight: Counter[Digest] = Counter()
        self._engines: dict[str, EngineRecord] = {}
        self._engines_lock = threading.Lock()
        self._restore_interrupted_swap()
        self.index = open_index(self.index_path)
        self.intent_settler = IntentSettler(self)
        self.prefetcher = PrefetchQueue(self._warm, workers=prefetch_workers)

    # -- lifecycle --------------------------------------------------------------------------

    def recover(self) -> int:
        """Finish or forget events left behind by a crash; returns how many were applied."""
        with self._swap.shared():
            applied = sum(settle_intent(self, i.adapter, i.seq) for i in self.index.intents())
        if applied:
            log.warning("recovered %d event(s) written durably before a crash", applied)
        return applied

    def settle_intent(self, adapter: AdapterName, seq: int) -> bool:
        """Apply or drop one kept intent as the durable log says (``catalog.intents``)."""
        with self._swap.shared(), self._adapter_locks.hold(adapter):
            return settle_intent(self, adapter, seq)

    def index_is_empty(self) -> bool:
        """No adapter and no purged name: a catalog whose names were all purged is not empty
        (its index holds their next seqs), so it is not rebuilt at every start."""
        counts = self.index.counts()
        return int(counts.get("adapters", 0)) + int(counts.get("purged", 0)) == 0

    def store_has_log(self) -> bool:
        return next(iter(self.store.list(LOG_PREFIX)), None) is not None

    def close(self) -> None:
        """Close the index (and run ``on_close``, e.g. marking a clean shutdown)."""
        self.intent_settler.close()
        self.prefetcher.close()
        with self._swap.exclusive():
            self.index.close()
        self._close_leases()
        if self.pack_cache is not None:
            self.pack_cache.close()
        self.spool.close()
        if self._on_close is not None:
            self._on_close()

    # -- reads ------------------------------------------------------------------------------

    def generation(self) -> tuple[object, int]:
        """A token that changes whenever a resolve or listing may answer differently: the
        index in use (``reindex`` swaps it) and its write generation. For read caches."""
        with self._swap.shared():
            return self.index, self.index.generation()

    def resolve(self, ref: Ref | str) -> Revision:
        """The live revision ``ref`` names. Raises ``InvalidReference``, ``NotFound``."""
        parsed = Ref.parse(ref) if isinstance(ref, str) else ref
        with self._swap.shared():
            return self.index.resolve(parsed)

    def resolve_at_generation(self, ref: Ref | str) -> tuple[tuple[object, int] | None, Revision]:
        """``resolve`` and the :meth:`generation` token of the state that answered it (``None``
        when no single generation did). For read caches: one lookup, no second generation read.
        """
        parsed = Ref.parse(ref) if isinstance(ref, str) else ref
        with self._swap.shared():
            index = self.index
            generation, revision = index.resolve_at_generation(parsed)
        return (None if generation is None else (index, generation)), revision

    def list_adapters(
        self, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[AdapterSummary]:
        """A page of adapters. Raises ``InvalidName`` (bad prefix), ``InvalidArgument`` (token)."""
        if prefix:
            tenant, _, name = prefix.partition("/")
            check_part("tenant", tenant)
            if name:
                check_part("name", name)
        with self._swap.shared():
            return self.index.list_adapters(prefix, page_size, page_token)

    def search_adapters(
        self,
        prefix: str = "",
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        *,
        base_id: str = "",
        tags: dict[str, str] | None = None,
        alias: str = "",
    ) -> Page[AdapterSummary]:
        """A page of adapters passing the filters (``RevisionIndex.search_adapters``).

        Raises ``InvalidName`` (bad prefix or alias), ``InvalidArgument`` (size or token).
        """
        if prefix:
            tenant, _, name = prefix.partition("/")
            check_part("tenant", tenant)
            if name:
                check_part("name", name)
        with self._swap.shared():
            return self.index.search_adapters(
                prefix, page_size, page_token, base_id=base_id, tags=tags, alias=alias
            )

    def list_revisions(
        self, adapter: AdapterName, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[Revision]:
        """A page of live revisions. Raises ``NotFound``, ``InvalidArgument`` (token)."""
        with self._swap.shared():
            return self.index.list_revisions(adapter, page_size, page_token)

    def alias_history(self, adapter: AdapterName, alias: str | None = None) -> list[AliasMove]:
        """Every move of ``alias`` (or of all aliases), oldest first. Raises ``NotFound``."""
        with self._swap.shared():
            if self.index.adapter_state(adapter) is None:
                raise NotFound(f"adapter {adapter} not found")
            return self.index.alias_history(adapter, alias or None)

    # -- writes -----------------------------------------------------------------------------

    def open_push(
        self,
        adapter: AdapterName,
        *,
        size_bytes: int,
        base_id: str = "",
        aliases: tuple[str, ...] | list[str] = (),
        metadata: dict[str, str] | None = None,
        expected_digest: str = "",
        provenance: PushProvenance | None = None,
    ) -> PushUpload:
        """Start a push of ``size_bytes`` pack bytes. ``provenance`` is recorded on the new
        revision as ``provenance.*`` and ``eval.*`` metadata (see ``catalog.revision_metadata``).

        Raises ``InvalidArgument``/``InvalidName`` for a bad header (``provenance.*`` keys in
        ``metadata`` included), ``NotFound`` for a provenance parent that does not resolve, and
        ``ResourceExhausted`` for a pack over the size limit."""
        if size_bytes <= 0:
            raise InvalidArgument(f"push of {adapter}: size_bytes must be positive")
        if size_bytes > self.limits.max_pack_bytes:
            raise ResourceExhausted(
                f"push of {adapter}: {size_bytes} bytes exceeds the "
                f"{self.limits.max_pack_bytes}-byte pack limit"
            )
        if len(aliases) > self.limits.max_aliases_per_push:
            raise InvalidArgument(f"at most {self.limits.max_aliases_per_push} aliases per push")
        clean_aliases = tuple(dict.fromkeys(check_alias_name(a) for a in aliases))
        check_user_keys(metadata or {}, f"push of {adapter}")
        recorded = self._provenance_of(provenance or PushProvenance()).metadata()
        clean_metadata = check_metadata({**(metadata or {}), **recorded}, self.limits)
        expected = Digest.parse(expected_digest) if expected_digest else None
        return PushUpload(
            self,
            adapter,
            size_bytes=size_bytes,
            base_id=base_id,
            aliases=clean_aliases,
            metadata=clean_metadata,
            expected_digest=expected,
            reservation=self.spool.reserve(f"push of {adapter}", size_bytes),
        )

    def _provenance_of(self, stated: PushProvenance) -> Provenance:
        parent = self.resolve(stated.parent) if stated.parent else None
        return Provenance(
            # who the service authenticated (catalog.identity); anonymous without --auth
            principal=caller() or ANONYMOUS,
            host=stated.host,
            run_id=stated.run_id,
            parent=parent,
            data_digest=stated.data_digest,
            eval=tuple(sorted(stated.eval.items())),
        )

    def push_bytes(
        self, adapter: AdapterName, data: bytes, **options: Any
    ) -> tuple[Revision, bool]:
        """Push a whole pack held in memory; see :meth:`open_push` and :meth:`PushUpload.commit`."""
        with self.open_push(adapter, size_bytes=len(data), **options) as upload:
            upload.write(data)
            return upload.commit()

    def _commit_push(
        self, upload: PushUpload, digest: Digest, manifest: dict[str, Any]
    ) -> tuple[Revision, bool]:
        adapter = upload.adapter
        with self._swap.shared(), self._adapter_locks.hold(adapter):
            upload.check_deadline()  # the lock may have been waited for
            existing = self._live_revision_with_digest(adapter, digest)
            created = existing is None
            number = (
                existing.number if existing else self._write_new_revision(upload, digest, manifest)
            )
            if created and self.pack_cache is not None:  # the first attach is then a tier hit
                upload.admit(self.pack_cache, digest)
            for alias in upload.aliases:
                self._move_alias_locked(adapter, alias, number, expected=None)
            revision = self.index.get_revision(adapter, number)
        if revision is None:  # pragma: no cover - deleted concurrently right after commit
            raise NotFound(f"revision {adapter}@{number} was deleted right after the push")
        return revision, created

    def _live_revision_with_digest(self, adapter: AdapterName, digest: Digest) -> Revision | None:
        try:
            return self.index.resolve(Ref(adapter, Selector.DIGEST, str(digest)))
        except NotFound:
            return None

    def _write_new_revision(
        self, upload: PushUpload, digest: Digest, manifest: dict[str, Any]
    ) -> int:
        adapter = upload.adapter
        state = self.index.adapter_state(adapter)
        seq = state.next_seq if state else self.index.next_seq(adapter)  # past a purge
        number = state.next_revision if state else 1
        with self._blob_guard:
            self._inflight[digest] += 1
        try:
            key = blob_key(digest)
            stored = self.store.size(key)
            if stored is None:
                # The spool file is ours to give: a local store on its filesystem links it.
                self.store.put_file(key, upload.path, if_absent=True, consume=True)
            elif stored != upload.size_bytes:
                raise DataLoss(
                    f"blob {digest} exists in {self.store.url} with {stored} bytes, "
                    f"but its pack has {upload.size_bytes}"
                )
            event = Event(
                adapter=adapter,
                seq=seq,
                op="push",
                at=time.time(),
                revision=number,
                digest=digest,
                size_bytes=upload.size_bytes,
                manifest=manifest,
                metadata=upload.metadata,
            )
            upload.check_deadline()  # the blob write may have been slow: last chance to refuse
            self._append(event)
        finally:
            with self._blob_guard:
                self._inflight[digest] -= 1
                if not self._inflight[digest]:
                    del self._inflight[digest]
        return number

    def _append(self, event: Event) -> None:
        """Intent, durable log write (conditional), index apply: the one write path.

        The event is stamped with the principal the call acts for (``catalog.identity``); an
        earlier write of the adapter with an unknown outcome is settled first (the caller holds
        the adapter's lock), and ``Conflict`` raised if it took this event's place."""
        if not event.principal and caller():
            event = replace(event, principal=caller())
        settle_earlier_intents(self, event)
        self.index.add_intent(event)
        try:
            written = self.store.put(
                log_key(event.adapter, event.seq), event.encode(), if_absent=True
            )
        except (Unavailable, DeadlineExceeded):  # it may have landed: settled when known
            self.intent_settler.settle_later(event.adapter, event.seq)
            raise
        except BaseException:
            self.index.drop_intent(event.adapter, event.seq)
            raise
        if not written:
            self.index.drop_intent(event.adapter, event.seq)
            raise Conflict(
                f"event {event.seq} of {event.adapter} exists in the durable log already: another "
                f"writer is using {self.store.url}; retry"
            )
        self.index.apply(event)

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts and per-tier occupancy and traffic (durable, nvme, host and gpu of engines)."""
        with self._swap.shared():
            counts = dict(self.index.counts())
        engines = self.engines()
        gpu = set().union(*(e.gpu for e in engines)) if engines else set()
        host = set().union(*(e.host for e in engines)) if engines else set()
        tiers: list[dict[str, Any]] = [
            {
                "tier": "durable",
                "entries": int(counts.get("revisions", 0)),
                "misses": self.counters["durable_reads"],
                "bytes_out": self.counters["durable_bytes_read"],
            }
        ]
        cache = self.pack_cache.stats() if self.pack_cache is not None else None
        if cache is not None:
            tiers.append(
                {
                    "tier": "nvme",
                    "bytes": cache["bytes"],
                    "entries": cache["entries"],
                    "hits": cache["hits"],
                    "misses": cache["misses"],
                    "evictions": cache["evictions"],
                    "capacity_bytes": cache["capacity_bytes"],
                    "bytes_in": cache["bytes_filled"],
                    "bytes_out": cache["bytes_read"],
                }
            )
        for name, held in (("host", host), ("gpu", gpu)):
            tier = {
                k: sum(e.tiers.get(name, {}).get(k, 0) for e in engines) for k in ENGINE_TIER_FIELDS
            }
            # A revision held by two engines is one distinct entry of the tier.
            tier["entries"] = len(held)
            tiers.append({"tier": name, **tier})
        counters = {
            **self.counters,
            **{f"prefetch_{k}": v for k, v in self.prefetcher.counters.items()},
            "hints_sent": self.hints.sent,
            "hint_subscribers": self.hints.subscribers(),
        }
        if cache is not None:
            counters.update({f"nvme_{k}": v for k, v in cache.items() if isinstance(v, int)})
        if self.leases is not None:
            counters.update({f"lease_{k}": v for k, v in self.leases.stats().items()})
        return {
            "adapters": int(counts.get("adapters", 0)),
            "revisions": int(counts.get("revisions", 0)),
            "aliases": int(counts.get("aliases", 0)),
            "index_bytes": int(counts.get("bytes_on_disk", 0)),
            "store_url": self.store.url,
            "engines": len(engines),
            "tiers": tiers,
            "counters": counters,
        }


__all__ = [
    "ENGINE_TIERS",
    "ENGINE_TIER_FIELDS",
    "Catalog",
    "CatalogError",
    "EngineRecord",
    "Limits",
    "PushUpload",
]
