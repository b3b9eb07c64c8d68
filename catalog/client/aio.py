"""The asyncio twin of :class:`catalog.client.CatalogClient` (same methods, awaitable)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.client.address import default_target
from catalog.client.answers import (
    cache_entries,
    checkpoint_doc,
    gc_doc,
    hint_from_pb,
    prefetch_progress,
    register_request,
    reindex_doc,
    stats_doc,
    verify_doc,
)
from catalog.client.channel import channel_settings, open_aio_channel
from catalog.client.errors import translated
from catalog.client.requests import (
    PackSource,
    ProgressCallback,
    PushResult,
    alias_request,
    check_range,
    push_header,
    push_requests,
    ref_text,
    source_size_and_digest,
)
from catalog.client.sync import (
    DEFAULT_TIMEOUT,
    MIN_PARALLEL_RANGE,
    TRANSFER_TIMEOUT,
    _name,
)
from catalog.client.transfer import FETCH_PACK_METHOD, PackReceiver, serialize_request
from catalog.convert import move_from_pb, revision_from_pb, summary_from_pb
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
    PushProvenance,
    Ref,
    Revision,
)


class AsyncCatalogClient:
    """``async with AsyncCatalogClient("127.0.0.1:7070") as c: await c.resolve("t/n")``."""

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        """Connect to ``target`` (``host``, ``host:port``, ``grpc://`` or ``grpcs://`` for TLS;
        None: ``$LORACAT_SERVER``, else ``127.0.0.1:7070``, as the CLI does). ``token`` is
        sent as ``authorization: Bearer <token>``; ``tls_ca`` verifies the server, ``tls_cert``
        and ``tls_key`` answer a server that asks for mutual TLS (each falls back to its
        ``$LORACAT_*`` variable, see ``catalog.client.channel``). Raises ``InvalidArgument``."""
        settings = channel_settings(
            default_target() if target is None else target,
            token=token,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        self.target = settings.address
        self.timeout = timeout
        self._channel = open_aio_channel(settings)
        self._stub = pb_grpc.CatalogStub(self._channel)
        # FetchPack's messages arrive undecoded (see catalog.client.transfer).
        self._fetch_pack = self._channel.unary_stream(
            FETCH_PACK_METHOD, request_serializer=serialize_request, response_deserializer=None
        )

    async def push(
        self,
        name: AdapterName | str,
        pack: PackSource,
        *,
        base_id: str = "",
        aliases: list[str] | tuple[str, ...] = (),
        metadata: dict[str, str] | None = None,
        provenance: PushProvenance | None = None,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> PushResult:
        """As :meth:`CatalogClient.push`."""
        size, digest = source_size_and_digest(pack)
        header = push_header(name, size, digest, base_id, aliases, metadata, provenance)
        with translated(self.target):
            response = await self._stub.Push(
                push_requests(pack, header, progress=progress), timeout=timeout
            )
        return PushResult(revision_from_pb(response.revision), response.created)

    async def push_peft_dir(
        self,
        name: AdapterName | str,
        directory: str | Path,
        *,
        base_id: str = "",
        aliases: list[str] | tuple[str, ...] = (),
        metadata: dict[str, str] | None = None,
        provenance: PushProvenance | None = None,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> PushResult:
        """As :meth:`CatalogClient.push_peft_dir`, always over the stream (the import runs on
        a worker thread). Raises ``InvalidPack`` (before any RPC), then as :meth:`push`."""
        from catalog.pack import import_peft_dir

        pack = await asyncio.to_thread(import_peft_dir, directory, base_id=base_id or None)
        return await self.push(
            name,
            pack,
            base_id=base_id,
            aliases=aliases,
            metadata=metadata,
            provenance=provenance,
            progress=progress,
            timeout=timeout,
        )

    async def resolve(self, ref: Ref | str) -> Revision:
        """As :meth:`CatalogClient.resolve`."""
        with translated(self.target):
            msg = await self._stub.Resolve(
                pb.ResolveRequest(ref=ref_text(ref)), timeout=self.timeout
            )
        return revision_from_pb(msg)

    async def list_adapters(
        self,
        prefix: str = "",
        *,
        page_size: int = 100,
        page_token: str = "",
        base_id: str = "",
        tags: dict[str, str] | None = None,
        alias: str = "",
    ) -> Page[AdapterSummary]:
        """As :meth:`CatalogClient.list_adapters`."""
        request = pb.ListAdaptersRequest(
            prefix=prefix,
            page_size=page_size,
            page_token=page_token,
            base_id=base_id,
            tags=dict(tags or {}),
            alias=alias,
        )
        with translated(self.target):
            response = await self._stub.ListAdapters(request, timeout=self.timeout)
        return Page(tuple(summary_from_pb(s) for s in response.adapters), response.next_page_token)

    async def iter_adapters(
        self, prefix: str = "", *, page_size: int = 1000, **filters: Any
    ) -> AsyncIterator[AdapterSummary]:
        """As :meth:`CatalogClient.iter_adapters`."""
        token = ""
        while True:
            page = await self.list_adapters(
                prefix, page_size=page_size, page_token=token, **filters
            )
            for item in page.items:
                yield item
            if not page.next_token:
                return
            token = page.next_token

    async def list_revisions(
        self, name: AdapterName | str, *, page_size: int = 100, page_token: str = ""
    ) -> Page[Revision]:
        """As :meth:`CatalogClient.list_revisions`."""
        with translated(self.target):
            response = await self._stub.ListRevisions(
                pb.ListRevisionsRequest(
                    name=_name(name), page_size=page_size, page_token=page_token
                ),
                timeout=self.timeout,
            )
        return Page(
            tuple(revision_from_pb(r) for r in response.revisions), response.next_page_token
        )

    async def iter_revisions(
        self, name: AdapterName | str, *, page_size: int = 1000
    ) -> AsyncIterator[Revision]:
        """As :meth:`CatalogClient.iter_revisions`."""
        token = ""
        while True:
            page = await self.list_revisions(name, page_size=page_size, page_token=token)
            for item in page.items:
                yield item
            if not page.next_token:
                return
            token = page.next_token

    async def set_alias(
        self,
        name: AdapterName | str,
        alias: str,
        revision: int | str,
        *,
        expected: int | None = None,
    ) -> AliasMove:
        """As :meth:`CatalogClient.set_alias`."""
        request = alias_request(name, alias, revision)
        if expected is not None:
            request.expected_revision = expected
        with translated(self.target):
            return move_from_pb(await self._stub.SetAlias(request, timeout=self.timeout))

    async def rollback(
        self,
        name: AdapterName | str,
        alias: str,
        *,
        expected: int | None = None,
        to: int | str = "",
    ) -> AliasMove:
        """As :meth:`CatalogClient.rollback`."""
        request = pb.RollbackRequest(name=_name(name), alias=alias, to=str(to) if to else "")
        if expected is not None:
            request.expected_revision = expected
        with translated(self.target):
            return move_from_pb(await self._stub.Rollback(request, timeout=self.timeout))

    async def alias_history(self, name: AdapterName | str, alias: str = "") -> list[AliasMove]:
        """As :meth:`CatalogClient.alias_history`."""
        with translated(self.target):
            response = await self._stub.AliasHistory(
                pb.AliasHistoryRequest(name=_name(name), alias=alias), timeout=self.timeout
            )
        return [move_from_pb(m) for m in response.moves]

    async def set_metadata(
        self,
        ref: Ref | str,
        metadata: dict[str, str] | None = None,
        *,
        remove: list[str] | tuple[str, ...] = (),
    ) -> Revision:
        """As :meth:`CatalogClient.set_metadata`."""
        request = pb.SetMetadataRequest(
            ref=ref_text(ref), metadata=dict(metadata or {}), remove=list(remove)
        )
        with translated(self.target):
            return revision_from_pb(await self._stub.SetMetadata(request, timeout=self.timeout))

    async def delete(
        self, ref: Ref | str, *, all_revisions: bool = False, force: bool = False
    ) -> list[int]:
        """As :meth:`CatalogClient.delete`."""
        request = pb.DeleteRequest(ref=ref_text(ref), all_revisions=all_revisions, force=force)
        with translated(self.target):
            response = await self._stub.Delete(request, timeout=self.timeout)
        return list(response.deleted)

    async def purge(self, name: AdapterName | str) -> int:
        """As :meth:`CatalogClient.purge`."""
        request = pb.PurgeRequest(name=_name(name))
        with translated(self.target):
            response = await self._stub.Purge(request, timeout=self.timeout)
        return int(response.revisions)

    async def fetch_with_revision(
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
        """As :meth:`CatalogClient.fetch_with_revision`: ``parallel`` > 1 fetches a whole pack
        as that many ranges on concurrent streams, named by digest, into one buffer."""
        check_range(offset, length)
        if parallel > 1 and offset == 0 and length == 0:
            return await self._fetch_parallel(ref, parallel, verify, progress, timeout)
        receiver = PackReceiver(ref_text(ref), offset, length, verify=verify)
        return await self._fetch_stream(receiver, progress, timeout)

    async def _fetch_stream(
        self, receiver: PackReceiver, progress: ProgressCallback | None, timeout: float
    ) -> tuple[Revision, memoryview]:
        request = pb.FetchPackRequest(
            ref=receiver.ref, offset=receiver.offset, length=receiver.length
        )
        with translated(self.target):
            async for raw in self._fetch_pack(request, timeout=timeout):
                receiver.add(raw)
                if progress:
                    progress(receiver.received, receiver.expected)
        return receiver.result()

    async def _fetch_parallel(
        self,
        ref: Ref | Revision | str,
        parallel: int,
        verify: bool,
        progress: ProgressCallback | None,
        timeout: float,
    ) -> tuple[Revision, memoryview]:
        revision = ref if isinstance(ref, Revision) else await self.resolve(ref)
        pinned = f"{revision.adapter}@{revision.digest}"
        size = revision.size_bytes
        span = max(MIN_PARALLEL_RANGE, -(-size // parallel))
        if span >= size:
            return await self._fetch_stream(
                PackReceiver(pinned, 0, 0, verify=verify), progress, timeout
            )
        buffer = memoryview(new_buffer(size))
        done = [0]

        async def fetch_range(start: int) -> None:
            into = buffer[start : min(size, start + span)]
            receiver = PackReceiver(pinned, start, span, verify=False, into=into)
            await self._fetch_stream(receiver, None, timeout)
            done[0] += receiver.received
            if progress:
                progress(done[0], size)

        await asyncio.gather(*(fetch_range(start) for start in range(0, size, span)))
        if verify:
            actual = await asyncio.to_thread(Digest.of, buffer, revision.digest.algorithm)
            if actual != revision.digest:
                raise DataLoss(
                    f"fetch of {pinned}: bytes hash to {actual}, expected {revision.digest}"
                )
        return revision, buffer.toreadonly()

    async def fetch(
        self,
        ref: Ref | Revision | str,
        *,
        offset: int = 0,
        length: int = 0,
        verify: bool = True,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> memoryview:
        """As :meth:`CatalogClient.fetch`: a read-only view of the verified pack bytes."""
        return (
            await self.fetch_with_revision(
                ref,
                offset=offset,
                length=length,
                verify=verify,
                progress=progress,
                timeout=timeout,
            )
        )[1]

    async def fetch_checked(self, revision: Revision) -> tuple[memoryview, bool]:
        """As :meth:`CatalogClient.fetch_checked`; this client always streams, so the catalog
        never vouches for the values (``False``)."""
        return await self.fetch(revision), False

    async def fetch_to(self, ref: Ref | Revision | str, dest: Path, **options: Any) -> Revision:
        """As :meth:`CatalogClient.fetch_to` (the file is written on a worker thread)."""
        revision, data = await self.fetch_with_revision(ref, **options)
        tmp = dest.with_name(f".{dest.name}.partial")
        await asyncio.to_thread(tmp.write_bytes, data)
        tmp.replace(dest)
        return revision

    # -- administration ---------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """As :meth:`CatalogClient.stats`."""
        with translated(self.target):
            return stats_doc(await self._stub.Stats(pb.StatsRequest(), timeout=self.timeout))

    async def gc(
        self, *, dry_run: bool = False, timeout: float = TRANSFER_TIMEOUT
    ) -> dict[str, Any]:
        """As :meth:`CatalogClient.gc`."""
        with translated(self.target):
            response = await self._stub.GarbageCollect(
                pb.GarbageCollectRequest(dry_run=dry_run), timeout=timeout
            )
        return gc_doc(response, dry_run)

    async def verify(self, *, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """As :meth:`CatalogClient.verify`."""
        with translated(self.target):
            return verify_doc(await self._stub.Verify(pb.VerifyRequest(), timeout=timeout))

    async def reindex(self, *, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """As :meth:`CatalogClient.reindex`."""
        with translated(self.target):
            return reindex_doc(await self._stub.Reindex(pb.ReindexRequest(), timeout=timeout))

    async def checkpoint(
        self, *, keep: int = 0, timeout: float = TRANSFER_TIMEOUT
    ) -> dict[str, Any]:
        """As :meth:`CatalogClient.checkpoint`."""
        with translated(self.target):
            return checkpoint_doc(
                await self._stub.Checkpoint(pb.CheckpointRequest(keep=keep), timeout=timeout)
            )

    # -- the NVMe tier -----------------------------------------------------------------------

    async def prefetch(
        self,
        refs: list[str],
        *,
        priority: int = 0,
        deadline_s: float = 0.0,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> AsyncIterator[PrefetchProgress]:
        """As :meth:`CatalogClient.prefetch`."""
        request = pb.PrefetchRequest(
            refs=[ref_text(r) for r in refs], priority=priority, deadline_s=deadline_s
        )
        with translated(self.target):
            async for item in self._stub.Prefetch(request, timeout=timeout):
                yield prefetch_progress(item)

    async def pin_pack(self, ref: Ref | str) -> Revision:
        """As :meth:`CatalogClient.pin_pack`."""
        with translated(self.target):
            return revision_from_pb(
                await self._stub.PinPack(
                    pb.PackRefRequest(ref=ref_text(ref)), timeout=TRANSFER_TIMEOUT
                )
            )

    async def unpin_pack(self, ref: Ref | str) -> Revision:
        """As :meth:`CatalogClient.unpin_pack`."""
        with translated(self.target):
            return revision_from_pb(
                await self._stub.UnpinPack(
                    pb.PackRefRequest(ref=ref_text(ref)), timeout=self.timeout
                )
            )

    async def evict_pack(self, ref: Ref | str) -> Revision:
        """As :meth:`CatalogClient.evict_pack`."""
        with translated(self.target):
            return revision_from_pb(
                await self._stub.EvictPack(
                    pb.PackRefRequest(ref=ref_text(ref)), timeout=self.timeout
                )
            )

    async def export_peft_dir(
        self,
        ref: Ref | Revision | str,
        dest: str | Path,
        *,
        nonce: str,
        fsync: bool = False,
        served_base: str = "",
        max_rank: int = 0,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> tuple[Revision, int]:
        """As :meth:`CatalogClient.export_peft_dir`."""
        request = pb.ExportPeftDirRequest(
            ref=ref_text(ref),
            dest=str(dest),
            nonce=nonce,
            fsync=fsync,
            served_base=served_base,
            max_rank=max_rank,
        )
        with translated(self.target):
            response = await self._stub.ExportPeftDir(request, timeout=timeout)
        return revision_from_pb(response.revision), response.bytes_written

    async def list_cache(self) -> list[dict[str, Any]]:
        """As :meth:`CatalogClient.list_cache`."""
        with translated(self.target):
            return cache_entries(
                await self._stub.ListCache(pb.ListCacheRequest(), timeout=self.timeout)
            )

    async def export_requests(
        self, *, since: float = 0.0, engine: str = "", timeout: float = TRANSFER_TIMEOUT
    ) -> list[dict[str, Any]]:
        """As :meth:`CatalogClient.export_requests`."""
        request = pb.ExportRequestsRequest(since=since, engine=engine)
        with translated(self.target):
            return [
                {
                    "time": r.time,
                    "kind": r.kind,
                    "ref": r.ref,
                    "size_bytes": r.size_bytes,
                    "engine": r.engine,
                }
                async for message in self._stub.ExportRequests(request, timeout=timeout)
                for r in message.requests
            ]

    # -- engines ----------------------------------------------------------------------------

    async def watch_hints(self, engine_id: str) -> AsyncIterator[Hint]:
        """As :meth:`CatalogClient.watch_hints`: hints until the server ends the stream or the
        iterating task is cancelled. Raises ``NotFound`` for an unregistered engine."""
        call = self._stub.WatchHints(pb.WatchHintsRequest(engine_id=engine_id))
        try:
            with translated(self.target):
                async for hint in call:
                    yield hint_from_pb(hint)
        finally:
            call.cancel()

    async def register_engine(
        self, engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int = 0
    ) -> None:
        """As :meth:`CatalogClient.register_engine`."""
        with translated(self.target):
            await self._stub.RegisterEngine(
                register_request(engine_id, base_id, num_slots, max_rank, host_bytes),
                timeout=self.timeout,
            )

    async def report_residency(
        self,
        engine_id: str,
        gpu: list[str],
        host: list[str],
        *,
        tiers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """As :meth:`CatalogClient.report_residency`."""
        for text in (*gpu, *host):
            Digest.parse(text)
        with translated(self.target):
            await self._stub.ReportResidency(
                pb.ReportResidencyRequest(
                    engine_id=engine_id,
                    gpu=gpu,
                    host=host,
                    tiers=[pb.TierStats(**tier) for tier in tiers],
                ),
                timeout=self.timeout,
            )

    # -- lifecycle --------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """As :meth:`CatalogClient.wait_ready` (``Unavailable`` after ``timeout``)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise Unavailable(f"catalog at {self.target} is unavailable") from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncCatalogClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
