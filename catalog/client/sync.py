"""The synchronous catalog client.

Every method returns catalog model types and raises ``CatalogError`` subclasses (never a raw
``grpc.RpcError``); every call carries a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.client.channel import channel_settings, open_channel
from catalog.client.errors import translated
from catalog.client.requests import (
    PackSource,
    ProgressCallback,
    PushResult,
    check_range,
    push_header,
    push_requests,
    ref_text,
    source_size_and_digest,
)
from catalog.client.transfer import (
    FETCH_PACK_METHOD,
    PackReceiver,
    serialize_request,
)
from catalog.convert import (
    move_from_pb,
    revision_from_pb,
    summary_from_pb,
)
from catalog.digest import Digest
from catalog.errors import DataLoss, Unavailable
from catalog.hostmem import new_buffer
from catalog.model import (
    AdapterName,
    AdapterSummary,
    AliasMove,
    Hint,
    Page,
    PrefetchProgress,
    Ref,
    Revision,
    every_item,
)

DEFAULT_TIMEOUT = 30.0
#: Ranges of a parallel fetch are at least this large; smaller packs use one stream.
MIN_PARALLEL_RANGE = 4 << 20
TRANSFER_TIMEOUT = 3600.0


T = TypeVar("T")


class HintStream:
    """A server stream of hints that another thread can cancel."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target

    def __iter__(self) -> Iterator[Hint]:
        with translated(self._target):
            for hint in self._call:
                yield Hint(hint.kind, hint.ref, hint.digest, hint.base_id, hint.reason, hint.at)

    def cancel(self) -> None:
        self._call.cancel()


def _name(adapter: AdapterName | str) -> str:
    return str(AdapterName.parse(adapter) if isinstance(adapter, str) else adapter)


class CatalogClient:
    """A connection to a loracat catalog server, e.g. ``CatalogClient("127.0.0.1:7070")``."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        """Connect to ``target`` (``host:port``; ``grpcs://host:port`` for TLS). ``token`` is
        sent as ``authorization: Bearer <token>``; ``tls_ca`` verifies the server, ``tls_cert``
        and ``tls_key`` answer a server that asks for mutual TLS (each falls back to its
        ``$LORACAT_*`` variable, see ``catalog.client.channel``). Raises ``InvalidArgument``."""
        settings = channel_settings(
            target, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self.target = settings.address
        self.timeout = timeout
        self._channel = open_channel(settings)
        self._stub = pb_grpc.CatalogStub(self._channel)
        # FetchPack's messages arrive undecoded (see catalog.client.transfer).
        self._fetch_pack = self._channel.unary_stream(
            FETCH_PACK_METHOD, request_serializer=serialize_request, response_deserializer=None
        )

    # -- revisions --------------------------------------------------------------------------

    def push(
        self,
        name: AdapterName | str,
        pack: PackSource,
        *,
        base_id: str = "",
        aliases: list[str] | tuple[str, ...] = (),
        metadata: dict[str, str] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> PushResult:
        """Push pack bytes (or a pack file) as a new revision of ``name``.

        The digest is computed locally first and sent ahead, so a corrupted transfer is refused.
        Raises ``InvalidPack``, ``InvalidName``, ``ResourceExhausted``, ``Conflict``.
        """
        size, digest = source_size_and_digest(pack)
        header = push_header(name, size, digest, base_id, aliases, metadata)
        with translated(self.target):
            response = self._stub.Push(
                push_requests(pack, header, progress=progress), timeout=timeout
            )
        return PushResult(revision_from_pb(response.revision), response.created)

    def resolve(self, ref: Ref | str) -> Revision:
        """The live revision ``ref`` names. Raises ``InvalidReference``, ``NotFound``."""
        with translated(self.target):
            return revision_from_pb(
                self._stub.Resolve(pb.ResolveRequest(ref=ref_text(ref)), timeout=self.timeout)
            )

    def list_adapters(
        self, prefix: str = "", *, page_size: int = 100, page_token: str = ""
    ) -> Page[AdapterSummary]:
        with translated(self.target):
            response = self._stub.ListAdapters(
                pb.ListAdaptersRequest(prefix=prefix, page_size=page_size, page_token=page_token),
                timeout=self.timeout,
            )
        return Page(tuple(summary_from_pb(s) for s in response.adapters), response.next_page_token)

    def iter_adapters(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[AdapterSummary]:
        """Every adapter under ``prefix``, fetching pages as the iteration goes."""
        return every_item(
            lambda token: self.list_adapters(prefix, page_size=page_size, page_token=token)
        )

    def list_revisions(
        self, name: AdapterName | str, *, page_size: int = 100, page_token: str = ""
    ) -> Page[Revision]:
        with translated(self.target):
            response = self._stub.ListRevisions(
                pb.ListRevisionsRequest(
                    name=_name(name), page_size=page_size, page_token=page_token
                ),
                timeout=self.timeout,
            )
        return Page(
            tuple(revision_from_pb(r) for r in response.revisions), response.next_page_token
        )

    def iter_revisions(
        self, name: AdapterName | str, *, page_size: int = 1000
    ) -> Iterator[Revision]:
        """Every live revision of ``name``, fetching pages as the iteration goes."""
        return every_item(
            lambda token: self.list_revisions(name, page_size=page_size, page_token=token)
        )

    # -- aliases ----------------------------------------------------------------------------

    def set_alias(
        self, name: AdapterName | str, alias: str, revision: int, *, expected: int | None = None
    ) -> AliasMove:
        """Move ``alias`` to ``revision`` (0 removes it) if it points at ``expected`` now.

        Raises ``Conflict`` when it does not (a lost compare-and-swap), ``NotFound``.
        """
        request = pb.SetAliasRequest(name=_name(name), alias=alias, revision=revision)
        if expected is not None:
            request.expected_revision = expected
        with translated(self.target):
            return move_from_pb(self._stub.SetAlias(request, timeout=self.timeout))

    def rollback(
        self, name: AdapterName | str, alias: str, *, expected: int | None = None
    ) -> AliasMove:
        """Move ``alias`` back to its previous revision; ``FailedPrecondition``, ``Conflict``."""
        request = pb.RollbackRequest(name=_name(name), alias=alias)
        if expected is not None:
            request.expected_revision = expected
        with translated(self.target):
            return move_from_pb(self._stub.Rollback(request, timeout=self.timeout))

    def alias_history(self, name: AdapterName | str, alias: str = "") -> list[AliasMove]:
        with translated(self.target):
            response = self._stub.AliasHistory(
                pb.AliasHistoryRequest(name=_name(name), alias=alias), timeout=self.timeout
            )
        return [move_from_pb(m) for m in response.moves]

    def set_metadata(self, ref: Ref | str, metadata: dict[str, str]) -> Revision:
        """Merge ``metadata`` (e.g. eval results) into a revision's metadata."""
        with translated(self.target):
            return revision_from_pb(
                self._stub.SetMetadata(
                    pb.SetMetadataRequest(ref=ref_text(ref), metadata=metadata),
                    timeout=self.timeout,
                )
            )

    def delete(self, ref: Ref | str, *, all_revisions: bool = False) -> list[int]:
        """Delete a revision (or every revision of the adapter); returns the deleted numbers."""
        with translated(self.target):
            response = self._stub.Delete(
                pb.DeleteRequest(ref=ref_text(ref), all_revisions=all_revisions),
                timeout=self.timeout,
            )
        return list(response.deleted)

    # -- packs ------------------------------------------------------------------------------

    def fetch(
        self,
        ref: Ref | Revision | str,
        *,
        offset: int = 0,
        length: int = 0,
        verify: bool = True,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> memoryview:
        """The pack bytes of ``ref`` (or a range of them), as a read-only view that nothing
        else references (``bytes(...)`` it for a ``bytes``). A whole pack is checked against
        its digest as it arrives.

        Raises ``NotFound``, ``InvalidReference``, ``InvalidArgument`` (a range past the end),
        ``DataLoss`` (bytes that do not match the digest, or a malformed stream).
        """
        return self.fetch_with_revision(
            ref, offset=offset, length=length, verify=verify, progress=progress, timeout=timeout
        )[1]

    def fetch_with_revision(
        self,
        ref: Ref | Revision | str,
        *,
        offset: int = 0,
        length: int = 0,
        verify: bool = True,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
        parallel: int = 1,
    ) -> tuple[Revision, memoryview]:
        """Like :meth:`fetch`, also returning the revision the server resolved.

        ``parallel`` > 1 fetches a whole pack as that many byte ranges on concurrent streams,
        each written straight into its place in the one buffer (for large packs over a real
        network; on loopback one stream is as fast). The ranges name the revision by its
        digest, so an alias that moves mid-fetch cannot mix two revisions.
        """
        check_range(offset, length)
        if parallel > 1 and offset == 0 and length == 0:
            return self._fetch_parallel(ref, parallel, verify, progress, timeout)
        return self._fetch_stream(
            PackReceiver(ref_text(ref), offset, length, verify=verify), progress, timeout
        )

    def _fetch_stream(
        self, receiver: PackReceiver, progress: ProgressCallback | None, timeout: float
    ) -> tuple[Revision, memoryview]:
        request = pb.FetchPackRequest(
            ref=receiver.ref, offset=receiver.offset, length=receiver.length
        )
        with translated(self.target):
            for raw in self._fetch_pack(request, timeout=timeout):
                receiver.add(raw)
                if progress:
                    progress(receiver.received, receiver.expected)
        return receiver.result()

    def _fetch_parallel(
        self,
        ref: Ref | Revision | str,
        parallel: int,
        verify: bool,
        progress: ProgressCallback | None,
        timeout: float,
    ) -> tuple[Revision, memoryview]:
        revision = ref if isinstance(ref, Revision) else self.resolve(ref)
        pinned = f"{revision.adapter}@{revision.digest}"
        size = revision.size_bytes
        span = max(MIN_PARALLEL_RANGE, -(-size // parallel))
        if span >= size:
            return self._fetch_stream(PackReceiver(pinned, 0, 0, verify=verify), progress, timeout)
        buffer = memoryview(new_buffer(size))
        done = [0]
        lock = threading.Lock()

        def fetch_range(start: int) -> None:
            into = buffer[start : min(size, start + span)]
            receiver = PackReceiver(pinned, start, span, verify=False, into=into)
            self._fetch_stream(receiver, None, timeout)
            with lock:
                done[0] += receiver.received
                if progress:
                    progress(done[0], size)

        with ThreadPoolExecutor(parallel, thread_name_prefix="loracat-fetch") as pool:
            list(pool.map(fetch_range, range(0, size, span)))
        if verify:
            actual = Digest.of(buffer, revision.digest.algorithm)
            if actual != revision.digest:
                raise DataLoss(
                    f"fetch of {pinned}: bytes hash to {actual}, expected {revision.digest}"
                )
        return revision, buffer.toreadonly()

    def fetch_to(self, ref: Ref | Revision | str, dest: Path, **options: Any) -> Revision:
        """Write the verified pack to ``dest`` (via a temporary name, renamed into place)."""
        revision, data = self.fetch_with_revision(ref, **options)
        tmp = dest.with_name(f".{dest.name}.partial")
        tmp.write_bytes(data)
        tmp.replace(dest)
        return revision

    # -- administration ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with translated(self.target):
            response = self._stub.Stats(pb.StatsRequest(), timeout=self.timeout)
        return {
            "adapters": response.adapters,
            "revisions": response.revisions,
            "aliases": response.aliases,
            "index_bytes": response.index_bytes,
            "store_url": response.store_url,
            "engines": response.engines,
            "tiers": [
                {
                    "tier": t.tier,
                    "bytes": t.bytes,
                    "entries": t.entries,
                    "hits": t.hits,
                    "misses": t.misses,
                    "evictions": t.evictions,
                    "capacity_bytes": t.capacity_bytes,
                    "bytes_in": t.bytes_in,
                    "bytes_out": t.bytes_out,
                }
                for t in response.tiers
            ],
            "counters": dict(response.counters),
        }

    def gc(self, *, dry_run: bool = False, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        with translated(self.target):
            response = self._stub.GarbageCollect(
                pb.GarbageCollectRequest(dry_run=dry_run), timeout=timeout
            )
        return {
            "deleted": list(response.deleted),
            "freed_bytes": response.freed_bytes,
            "kept": response.kept,
            "dry_run": dry_run,
        }

    def verify(self, *, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        with translated(self.target):
            response = self._stub.Verify(pb.VerifyRequest(), timeout=timeout)
        return {
            "checked_blobs": response.checked_blobs,
            "checked_events": response.checked_events,
            "problems": list(response.problems),
        }

    def reindex(self, *, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        with translated(self.target):
            response = self._stub.Reindex(pb.ReindexRequest(), timeout=timeout)
        return {
            "adapters": response.adapters,
            "revisions": response.revisions,
            "events": response.events,
            "seconds": response.seconds,
        }

    def checkpoint(self, *, keep: int = 0, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """Fold the durable log into a checkpoint (``keep``: how many to keep; 0 = default)."""
        with translated(self.target):
            response = self._stub.Checkpoint(pb.CheckpointRequest(keep=keep), timeout=timeout)
        return {
            field.name: getattr(response, field.name) for field in response.DESCRIPTOR.fields
        } | {"pruned": list(response.pruned)}

    # -- the NVMe tier -----------------------------------------------------------------------

    def prefetch(
        self,
        refs: list[str],
        *,
        priority: int = 0,
        deadline_s: float = 0.0,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> Iterator[PrefetchProgress]:
        """Warm the server's NVMe tier; yields one progress record per reference as it ends."""
        request = pb.PrefetchRequest(
            refs=[ref_text(r) for r in refs], priority=priority, deadline_s=deadline_s
        )
        with translated(self.target):
            for item in self._stub.Prefetch(request, timeout=timeout):
                yield PrefetchProgress(
                    item.ref, item.state, item.digest, item.size_bytes, item.error
                )

    def pin_pack(self, ref: Ref | str) -> Revision:
        """Load ``ref``'s pack into the NVMe tier and keep it there until unpinned."""
        with translated(self.target):
            return revision_from_pb(
                self._stub.PinPack(pb.PackRefRequest(ref=ref_text(ref)), timeout=TRANSFER_TIMEOUT)
            )

    def unpin_pack(self, ref: Ref | str) -> Revision:
        with translated(self.target):
            return revision_from_pb(
                self._stub.UnpinPack(pb.PackRefRequest(ref=ref_text(ref)), timeout=self.timeout)
            )

    def evict_pack(self, ref: Ref | str) -> Revision:
        with translated(self.target):
            return revision_from_pb(
                self._stub.EvictPack(pb.PackRefRequest(ref=ref_text(ref)), timeout=self.timeout)
            )

    def list_cache(self) -> list[dict[str, Any]]:
        with translated(self.target):
            response = self._stub.ListCache(pb.ListCacheRequest(), timeout=self.timeout)
        return [
            {
                "digest": e.digest,
                "size_bytes": e.size_bytes,
                "pins": e.pins,
                "inserted_at": e.inserted_at,
            }
            for e in response.entries
        ]

    # -- engines ----------------------------------------------------------------------------

    def watch_hints(self, engine_id: str) -> HintStream:
        """The catalog's hints for a registered engine: iterate it (on a thread of its own) until
        the server ends it or :meth:`HintStream.cancel` is called. Raises ``NotFound`` (while
        iterating) for an engine that is not registered."""
        return HintStream(
            self._stub.WatchHints(pb.WatchHintsRequest(engine_id=engine_id)), self.target
        )

    def register_engine(
        self, engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int = 0
    ) -> None:
        with translated(self.target):
            self._stub.RegisterEngine(
                pb.RegisterEngineRequest(
                    engine_id=engine_id,
                    base_id=base_id,
                    num_slots=num_slots,
                    max_rank=max_rank,
                    host_bytes=host_bytes,
                ),
                timeout=self.timeout,
            )

    def report_residency(
        self,
        engine_id: str,
        gpu: list[str],
        host: list[str],
        *,
        tiers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """What an engine holds (digests in GPU slots and host memory) and, optionally, its
        counters for those tiers (``tier`` plus any of ``catalog.core.ENGINE_TIER_FIELDS``)."""
        for text in (*gpu, *host):
            Digest.parse(text)
        with translated(self.target):
            self._stub.ReportResidency(
                pb.ReportResidencyRequest(
                    engine_id=engine_id,
                    gpu=gpu,
                    host=host,
                    tiers=[pb.TierStats(**tier) for tier in tiers],
                ),
                timeout=self.timeout,
            )

    # -- lifecycle --------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected (``Unavailable`` after ``timeout``)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"catalog at {self.target} is unavailable") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CatalogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
