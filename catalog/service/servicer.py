"""The gRPC servicer: decode the request, call the catalog core, encode the answer.

No business logic lives here; errors are raised as ``CatalogError`` and mapped to status codes by
the handler ``catalog.service.handlers`` builds around each method.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.cache.layout import host_id
from catalog.convert import move_to_pb, revision_to_pb, summary_to_pb
from catalog.core import ENGINE_TIER_FIELDS, Catalog
from catalog.errors import FailedPrecondition, InvalidArgument
from catalog.local_push import PushInbox, is_local_peer, push_from_inbox
from catalog.model import AdapterName, PushProvenance, Ref
from catalog.peft_export import PeftExporter, check_fits
from catalog.service.request_record import RequestRecord, caller_of
from catalog.service.resolve_cache import GenerationCache
from catalog.warm_inbox import WarmPolicy

DEFAULT_CHUNK_BYTES = 1 << 20
#: The largest push chunk the servicer accepts; the channel limit sits above it so an oversized
#: chunk gets a precise INVALID_ARGUMENT rather than a transport error.
MAX_CHUNK_BYTES = 4 << 20
MAX_MESSAGE_BYTES = 8 << 20
#: Recorded requests per ExportRequests message (~100 bytes each).
EXPORT_BATCH = 1000


def _expected(msg: pb.SetAliasRequest | pb.RollbackRequest) -> int | None:
    return msg.expected_revision if msg.HasField("expected_revision") else None


def _push_options(header: pb.PushHeader) -> dict[str, Any]:
    """``Catalog.open_push``'s options from a push header (the stream's and the inbox's)."""
    return {
        "base_id": header.base_id,
        "aliases": list(header.aliases),
        "metadata": dict(header.metadata),
        "expected_digest": header.expected_digest,
        "provenance": PushProvenance(
            host=header.host,
            run_id=header.run_id,
            parent=header.parent,
            data_digest=header.data_digest,
            eval=dict(header.eval),
        ),
    }


class CatalogServicer(pb_grpc.CatalogServicer):
    def __init__(
        self,
        catalog: Catalog,
        record: RequestRecord | None = None,
        peft_exporter: PeftExporter | None = None,
        warm_inbox: WarmPolicy | None = None,
    ) -> None:
        """``record``: where resolves and fetches are recorded for capacity planning (None:
        nowhere, and ``ExportRequests`` answers FAILED_PRECONDITION). ``peft_exporter``: where
        ``ExportPeftDir`` may write (None: it answers FAILED_PRECONDITION). ``warm_inbox``:
        the warm files the push inbox keeps for colocated pushes (``catalog.warm_inbox``;
        None: its default)."""
        self.catalog = catalog
        self.resolves: GenerationCache[pb.Revision] = GenerationCache(catalog.generation)
        self.record = record
        self.peft_exporter = peft_exporter or PeftExporter(None)
        self._inbox: PushInbox | None = None
        self._inbox_lock = threading.Lock()
        self._warm_inbox = warm_inbox or WarmPolicy()
        if self._inbox_directory().is_dir():  # used before: its leftovers are handled now
            self._push_inbox()

    def close(self) -> None:
        """Let go of the push inbox (its warm-file refill ends; a pass in progress finishes
        the file it makes). The server calls this once it has stopped serving calls."""
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, None
        if inbox is not None:
            inbox.close()

    def Push(
        self, request_iterator: Iterator[pb.PushRequest], context: grpc.ServicerContext
    ) -> pb.PushResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("a push must start with a header message")
        header = first.header
        adapter = AdapterName.parse(header.name)
        with self.catalog.open_push(
            adapter, size_bytes=header.size_bytes, **_push_options(header)
        ) as upload:
            upload.time_left = getattr(context, "time_remaining", None)
            for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("a push carries one header followed only by chunks")
                if len(message.chunk) > MAX_CHUNK_BYTES:
                    raise InvalidArgument(
                        f"push chunk of {len(message.chunk)} bytes exceeds the "
                        f"{MAX_CHUNK_BYTES}-byte chunk limit"
                    )
                upload.write(message.chunk)
            revision, created = upload.commit()
        return pb.PushResponse(revision=revision_to_pb(revision), created=created)

    def GetPushInbox(
        self, request: pb.PushInboxRequest, context: grpc.ServicerContext
    ) -> pb.PushInbox:
        if not is_local_peer(context.peer()):  # no use elsewhere, and it names the root
            return pb.PushInbox()
        return pb.PushInbox(directory=str(self._push_inbox().directory), host_id=host_id())

    def PushFromInbox(
        self, request: pb.PushFromInboxRequest, context: grpc.ServicerContext
    ) -> pb.PushResponse:
        header = request.header
        inbox = self._push_inbox()
        committed = None
        try:
            revision, created = push_from_inbox(
                self.catalog,
                inbox,
                request.file_name,
                AdapterName.parse(header.name),
                size_bytes=header.size_bytes,
                time_left=getattr(context, "time_remaining", None),
                **_push_options(header),
            )
            committed = header.size_bytes
        finally:  # the pushed file may have been a warm one: refilled on a thread of its own
            inbox.warm.pushed(committed)
        return pb.PushResponse(revision=revision_to_pb(revision), created=created)

    def _push_inbox(self) -> PushInbox:
        """The catalog's push inbox (``catalog.local_push``), made and swept on first use."""
        with self._inbox_lock:
            if self._inbox is None:
                self._inbox = PushInbox(self._inbox_directory(), self._warm_inbox)
                self._inbox.sweep()
            return self._inbox

    def _inbox_directory(self) -> Path:
        return self.catalog.spool_dir.parent / "inbox"

    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext) -> pb.Revision:
        ref = request.ref

        def lookup() -> tuple[object | None, pb.Revision]:
            generation, revision = self.catalog.resolve_at_generation(ref)
            return generation, revision_to_pb(revision)

        answer = self.resolves.get(ref, lookup)
        if self.record is not None:
            self.record.add(
                "resolve", f"{answer.name}@{answer.revision}", answer.size_bytes, caller_of(context)
            )
        return answer

    def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> pb.ListAdaptersResponse:
        page = self.catalog.search_adapters(
            request.prefix,
            request.page_size or 100,
            request.page_token,
            base_id=request.base_id,
            tags=dict(request.tags),
            alias=request.alias,
        )
        return pb.ListAdaptersResponse(
            adapters=[summary_to_pb(s) for s in page.items], next_page_token=page.next_token
        )

    def ListRevisions(
        self, request: pb.ListRevisionsRequest, context: grpc.ServicerContext
    ) -> pb.ListRevisionsResponse:
        page = self.catalog.list_revisions(
            AdapterName.parse(request.name), request.page_size or 100, request.page_token
        )
        return pb.ListRevisionsResponse(
            revisions=[revision_to_pb(r) for r in page.items], next_page_token=page.next_token
        )

    def SetAlias(self, request: pb.SetAliasRequest, context: grpc.ServicerContext) -> pb.AliasMove:
        move = self.catalog.set_alias(
            AdapterName.parse(request.name),
            request.alias,
            request.revision,
            expected=_expected(request),
            target=request.target,
        )
        return move_to_pb(move)

    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> pb.AliasMove:
        move = self.catalog.rollback(
            AdapterName.parse(request.name),
            request.alias,
            expected=_expected(request),
            to=request.to,
        )
        return move_to_pb(move)

    def AliasHistory(
        self, request: pb.AliasHistoryRequest, context: grpc.ServicerContext
    ) -> pb.AliasHistoryResponse:
        moves = self.catalog.alias_history(AdapterName.parse(request.name), request.alias or None)
        return pb.AliasHistoryResponse(moves=[move_to_pb(m) for m in moves])

    def SetMetadata(
        self, request: pb.SetMetadataRequest, context: grpc.ServicerContext
    ) -> pb.Revision:
        return revision_to_pb(
            self.catalog.set_metadata(
                request.ref, dict(request.metadata), remove=list(request.remove)
            )
        )

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        deleted = self.catalog.delete(
            request.ref, all_revisions=request.all_revisions, force=request.force
        )
        return pb.DeleteResponse(deleted=deleted)

    def Purge(self, request: pb.PurgeRequest, context: grpc.ServicerContext) -> pb.PurgeResponse:
        adapter = AdapterName.parse(request.name)
        revisions = self.catalog.purge(adapter)
        return pb.PurgeResponse(name=str(adapter), revisions=revisions)

    def FetchPack(
        self, request: pb.FetchPackRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.PackChunk]:
        revision = self.catalog.resolve(Ref.parse(request.ref))
        size = revision.size_bytes
        if self.record is not None:
            self.record.add(
                "fetch", f"{revision.adapter}@{revision.number}", size, caller_of(context)
            )
        if request.offset > size:
            raise InvalidArgument(f"offset {request.offset} is beyond the {size}-byte pack")
        length = size - request.offset if request.length == 0 else request.length
        piece_bytes = min(request.chunk_size or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
        # Pieces as the NVMe tier reads and checks them: the pack is never assembled here.
        pieces = self.catalog.iter_pack_range(revision, request.offset, length, piece_bytes)
        # The first chunk carries the revision, even for an empty range.
        first = next(pieces, b"")
        yield pb.PackChunk(offset=request.offset, data=first, revision=revision_to_pb(revision))
        position = request.offset + len(first)
        for piece in pieces:
            yield pb.PackChunk(offset=position, data=piece)
            position += len(piece)

    def ExportPeftDir(
        self, request: pb.ExportPeftDirRequest, context: grpc.ServicerContext
    ) -> pb.ExportPeftDirResponse:
        revision = self.catalog.resolve(Ref.parse(request.ref))
        # Every check of the fit and the destination before a byte is read (a refusal costs
        # no S3 read): an engine's cold first request sends its base and rank limit here
        # instead of resolving first.
        check_fits(request.ref, revision, request.served_base, request.max_rank)
        dest = self.peft_exporter.check_destination(request.dest, request.nonce)
        if self.record is not None:
            self.record.add(
                "fetch",
                f"{revision.adapter}@{revision.number}",
                revision.size_bytes,
                caller_of(context),
            )
        # A pack not in the NVMe tier is written from the durable bytes as its digest is
        # checked, and the tier filled after the engine is answered (its cold first request
        # is waiting on this call).
        read = self.catalog.read_pack_bytes_deferred(revision)
        written = self.peft_exporter.export_read(read, dest, fsync=request.fsync)
        return pb.ExportPeftDirResponse(revision=revision_to_pb(revision), bytes_written=written)

    def ExportRequests(
        self, request: pb.ExportRequestsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RecordedRequests]:
        if self.record is None:
            raise FailedPrecondition(
                "this server keeps no request record (started with --request-record 0)"
            )
        entries = self.record.since(request.since, request.engine)
        for start in range(0, max(1, len(entries)), EXPORT_BATCH):
            message = pb.RecordedRequests(
                requests=[
                    pb.RecordedRequest(
                        time=e.time,
                        ref=e.ref,
                        size_bytes=e.size_bytes,
                        engine=e.engine,
                        kind=e.kind,
                    )
                    for e in entries[start : start + EXPORT_BATCH]
                ]
            )
            if start == 0:
                message.capacity = self.record.capacity
                message.dropped = self.record.dropped
            yield message

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        stats = self.catalog.stats()
        return pb.StatsResponse(
            adapters=stats["adapters"],
            revisions=stats["revisions"],
            aliases=stats["aliases"],
            index_bytes=stats["index_bytes"],
            store_url=stats["store_url"],
            engines=stats["engines"],
            tiers=[pb.TierStats(**tier) for tier in stats["tiers"]],
            counters={k: float(v) for k, v in stats.get("counters", {}).items()},
        )

    def GarbageCollect(
        self, request: pb.GarbageCollectRequest, context: grpc.ServicerContext
    ) -> pb.GarbageCollectResponse:
        deleted, freed, kept = self.catalog.gc(dry_run=request.dry_run)
        return pb.GarbageCollectResponse(
            deleted=[str(d) for d in deleted], freed_bytes=freed, kept=kept
        )

    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyResponse:
        blobs, events, problems = self.catalog.verify()
        return pb.VerifyResponse(checked_blobs=blobs, checked_events=events, problems=problems)

    def Reindex(
        self, request: pb.ReindexRequest, context: grpc.ServicerContext
    ) -> pb.ReindexResponse:
        adapters, revisions, events, seconds = self.catalog.reindex()
        return pb.ReindexResponse(
            adapters=adapters, revisions=revisions, events=events, seconds=seconds
        )

    def Prefetch(
        self, request: pb.PrefetchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.PrefetchProgress]:
        for item in self.catalog.prefetch(
            list(request.refs), priority=request.priority, deadline_s=request.deadline_s
        ):
            yield pb.PrefetchProgress(
                ref=item.ref,
                state=item.state,
                digest=item.digest,
                size_bytes=item.size_bytes,
                error=item.error,
            )

    def PinPack(self, request: pb.PackRefRequest, context: grpc.ServicerContext) -> pb.Revision:
        return revision_to_pb(self.catalog.pin_pack(request.ref))

    def UnpinPack(self, request: pb.PackRefRequest, context: grpc.ServicerContext) -> pb.Revision:
        return revision_to_pb(self.catalog.unpin_pack(request.ref))

    def EvictPack(self, request: pb.PackRefRequest, context: grpc.ServicerContext) -> pb.Revision:
        return revision_to_pb(self.catalog.evict_pack(request.ref))

    def ListCache(
        self, request: pb.ListCacheRequest, context: grpc.ServicerContext
    ) -> pb.ListCacheResponse:
        cache = self.catalog.pack_cache
        entries = [] if cache is None else list(cache.entries())
        return pb.ListCacheResponse(
            entries=[
                pb.CacheEntry(
                    digest=str(e.digest), size_bytes=e.size, pins=e.pins, inserted_at=e.inserted_at
                )
                for e in entries
            ]
        )

    def GetPackCacheLocation(
        self, request: pb.PackCacheLocationRequest, context: grpc.ServicerContext
    ) -> pb.PackCacheLocation:
        location = self.catalog.pack_cache_location()
        if location is None:
            return pb.PackCacheLocation()
        return pb.PackCacheLocation(
            cache_dir=location.cache_dir,
            instance_id=location.instance_id,
            host_id=location.host_id,
            pid=location.pid,
        )

    def LeasePack(
        self, request: pb.LeasePackRequest, context: grpc.ServicerContext
    ) -> pb.PackLease:
        revision, lease = self.catalog.lease_pack(request.ref, ttl_s=request.ttl_s)
        return pb.PackLease(
            revision=revision_to_pb(revision), lease_id=lease.lease_id, ttl_s=lease.ttl_s
        )

    def ReleasePackLease(
        self, request: pb.ReleasePackLeaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleasePackLeaseResponse:
        corrupt = request.corrupt_offset if request.HasField("corrupt_offset") else -1
        if request.HasField("corrupt_offset") and corrupt < 0:
            raise InvalidArgument(f"corrupt_offset must be >= 0, got {corrupt}")
        released = self.catalog.release_pack_lease(request.lease_id, corrupt_offset=corrupt)
        return pb.ReleasePackLeaseResponse(released=released)

    def ReportPackReads(
        self, request: pb.ReportPackReadsRequest, context: grpc.ServicerContext
    ) -> pb.ReportPackReadsResponse:
        recorded = self.catalog.report_pack_reads(list(request.refs))
        return pb.ReportPackReadsResponse(recorded=recorded)

    def WatchHints(
        self, request: pb.WatchHintsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Hint]:
        for hint in self.catalog.watch_hints(
            request.engine_id, stop=lambda: not context.is_active()
        ):
            yield pb.Hint(
                kind=hint.kind,
                ref=hint.ref,
                digest=hint.digest,
                base_id=hint.base_id,
                reason=hint.reason,
                at=hint.at,
            )

    def Checkpoint(
        self, request: pb.CheckpointRequest, context: grpc.ServicerContext
    ) -> pb.CheckpointResponse:
        return pb.CheckpointResponse(**self.catalog.checkpoint(keep=request.keep or 2).to_json())

    def RegisterEngine(
        self, request: pb.RegisterEngineRequest, context: grpc.ServicerContext
    ) -> pb.RegisterEngineResponse:
        self.catalog.register_engine(
            request.engine_id,
            request.base_id,
            request.num_slots,
            request.max_rank,
            request.host_bytes,
        )
        return pb.RegisterEngineResponse()

    def ReportResidency(
        self, request: pb.ReportResidencyRequest, context: grpc.ServicerContext
    ) -> pb.ReportResidencyResponse:
        # counted before anything is copied out of the message: an oversized report is
        # refused without making a Python string per digest
        self.catalog.check_report_size(len(request.gpu), len(request.host))
        tiers = [
            {
                "tier": t.tier,
                **{name: getattr(t, name) for name in ENGINE_TIER_FIELDS},
            }
            for t in request.tiers
        ]
        self.catalog.report_residency(
            request.engine_id, list(request.gpu), list(request.host), tiers
        )
        return pb.ReportResidencyResponse()
