"""The asyncio twin of :class:`catalog.client.CatalogClient` (same methods, awaitable)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.client import answers, requests
from catalog.client.channel import channel_settings, open_aio_channel
from catalog.client.errors import not_ready, translated
from catalog.client.parallel_fetch import parallel_fetch
from catalog.client.requests import (
    DEFAULT_TIMEOUT,
    TRANSFER_TIMEOUT,
    PackSource,
    ProgressCallback,
    PushResult,
    ref_text,
)
from catalog.client.transfer import PackReceiver, fetch_request, raw_fetch_pack, write_pack_file
from catalog.convert import move_from_pb, revision_from_pb
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

T = TypeVar("T")


async def _every_item(fetch_page: Callable[[str], Awaitable[Page[T]]]) -> AsyncIterator[T]:
    """Walk a paged listing: ``await fetch_page(token)`` until a page has no ``next_token``
    (``catalog.model.every_item``'s asyncio twin)."""
    token = ""
    while True:
        page = await fetch_page(token)
        for item in page.items:
            yield item
        if not page.next_token:
            return
        token = page.next_token


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
            target, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self.target = settings.address
        self.timeout = timeout
        self._channel = open_aio_channel(settings)
        self._stub = pb_grpc.CatalogStub(self._channel)
        # FetchPack's messages arrive undecoded (see catalog.client.transfer).
        self._fetch_pack = raw_fetch_pack(self._channel)

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None = None
    ) -> T:
        """``await method(request)`` of the stub under a deadline (``timeout``, else the
        client's), its RPC error raised as the catalog's exception."""
        with translated(self.target):
            return await method(request, timeout=self.timeout if timeout is None else timeout)

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
        """As :meth:`CatalogClient.push`, always over the stream."""
        options = (base_id, aliases, metadata, provenance)
        header = requests.streamed_push_header(name, pack, options)
        pushing = requests.push_requests(pack, header, progress=progress)
        return answers.push_result(await self._call(self._stub.Push, pushing, timeout))

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
        request = pb.ResolveRequest(ref=ref_text(ref))
        return revision_from_pb(await self._call(self._stub.Resolve, request))

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
        request = requests.list_adapters_request(
            prefix, page_size, page_token, base_id, tags, alias
        )
        return answers.adapters_page(await self._call(self._stub.ListAdapters, request))

    def iter_adapters(
        self, prefix: str = "", *, page_size: int = 1000, **filters: Any
    ) -> AsyncIterator[AdapterSummary]:
        """As :meth:`CatalogClient.iter_adapters`."""
        return _every_item(
            lambda token: self.list_adapters(
                prefix, page_size=page_size, page_token=token, **filters
            )
        )

    async def list_revisions(
        self, name: AdapterName | str, *, page_size: int = 100, page_token: str = ""
    ) -> Page[Revision]:
        """As :meth:`CatalogClient.list_revisions`."""
        request = requests.list_revisions_request(name, page_size, page_token)
        return answers.revisions_page(await self._call(self._stub.ListRevisions, request))

    def iter_revisions(
        self, name: AdapterName | str, *, page_size: int = 1000
    ) -> AsyncIterator[Revision]:
        """As :meth:`CatalogClient.iter_revisions`."""
        return _every_item(
            lambda token: self.list_revisions(name, page_size=page_size, page_token=token)
        )

    async def set_alias(
        self,
        name: AdapterName | str,
        alias: str,
        revision: int | str,
        *,
        expected: int | None = None,
    ) -> AliasMove:
        """As :meth:`CatalogClient.set_alias`."""
        request = requests.alias_request(name, alias, revision, expected)
        return move_from_pb(await self._call(self._stub.SetAlias, request))

    async def rollback(
        self,
        name: AdapterName | str,
        alias: str,
        *,
        expected: int | None = None,
        to: int | str = "",
    ) -> AliasMove:
        """As :meth:`CatalogClient.rollback`."""
        request = requests.rollback_request(name, alias, expected, to)
        return move_from_pb(await self._call(self._stub.Rollback, request))

    async def alias_history(self, name: AdapterName | str, alias: str = "") -> list[AliasMove]:
        """As :meth:`CatalogClient.alias_history`."""
        request = pb.AliasHistoryRequest(name=requests.adapter_text(name), alias=alias)
        return answers.alias_moves(await self._call(self._stub.AliasHistory, request))

    async def set_metadata(
        self,
        ref: Ref | str,
        metadata: dict[str, str] | None = None,
        *,
        remove: list[str] | tuple[str, ...] = (),
    ) -> Revision:
        """As :meth:`CatalogClient.set_metadata`."""
        request = requests.set_metadata_request(ref, metadata, remove)
        return revision_from_pb(await self._call(self._stub.SetMetadata, request))

    async def delete(
        self, ref: Ref | str, *, all_revisions: bool = False, force: bool = False
    ) -> list[int]:
        """As :meth:`CatalogClient.delete`."""
        request = pb.DeleteRequest(ref=ref_text(ref), all_revisions=all_revisions, force=force)
        return list((await self._call(self._stub.Delete, request)).deleted)

    async def purge(self, name: AdapterName | str) -> int:
        """As :meth:`CatalogClient.purge`."""
        request = pb.PurgeRequest(name=requests.adapter_text(name))
        return int((await self._call(self._stub.Purge, request)).revisions)

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
        requests.check_range(offset, length)
        if parallel > 1 and offset == 0 and length == 0:
            return await self._fetch_parallel(ref, parallel, verify, progress, timeout)
        receiver = PackReceiver(ref_text(ref), offset, length, verify=verify)
        return await self._fetch_stream(receiver, progress, timeout)

    async def _fetch_stream(
        self, receiver: PackReceiver, progress: ProgressCallback | None, timeout: float
    ) -> tuple[Revision, memoryview]:
        with translated(self.target):
            async for raw in self._fetch_pack(fetch_request(receiver), timeout=timeout):
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
        ranges = parallel_fetch(revision, parallel, verify=verify)
        if ranges is None:
            whole = PackReceiver(requests.pinned_ref(revision), 0, 0, verify=verify)
            return await self._fetch_stream(whole, progress, timeout)

        async def fetch_range(receiver: PackReceiver) -> None:
            await self._fetch_stream(receiver, None, timeout)
            ranges.landed(receiver, progress)  # tasks of one loop: one call at a time

        await asyncio.gather(*(fetch_range(receiver) for receiver in ranges.receivers()))
        return await asyncio.to_thread(ranges.result)

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
        await asyncio.to_thread(write_pack_file, dest, data)
        return revision

    # -- administration ---------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """As :meth:`CatalogClient.stats`."""
        return answers.stats_doc(await self._call(self._stub.Stats, pb.StatsRequest()))

    async def gc(
        self, *, dry_run: bool = False, timeout: float = TRANSFER_TIMEOUT
    ) -> dict[str, Any]:
        """As :meth:`CatalogClient.gc`."""
        request = pb.GarbageCollectRequest(dry_run=dry_run)
        response = await self._call(self._stub.GarbageCollect, request, timeout)
        return answers.gc_doc(response, dry_run)

    async def verify(self, *, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """As :meth:`CatalogClient.verify`."""
        response = await self._call(self._stub.Verify, pb.VerifyRequest(), timeout)
        return answers.verify_doc(response)

    async def reindex(self, *, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """As :meth:`CatalogClient.reindex`."""
        response = await self._call(self._stub.Reindex, pb.ReindexRequest(), timeout)
        return answers.reindex_doc(response)

    async def checkpoint(
        self, *, keep: int = 0, timeout: float = TRANSFER_TIMEOUT
    ) -> dict[str, Any]:
        """As :meth:`CatalogClient.checkpoint`."""
        request = pb.CheckpointRequest(keep=keep)
        return answers.checkpoint_doc(await self._call(self._stub.Checkpoint, request, timeout))

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
        request = requests.prefetch_request(refs, priority, deadline_s)
        with translated(self.target):
            async for item in self._stub.Prefetch(request, timeout=timeout):
                yield answers.prefetch_progress(item)

    async def pin_pack(self, ref: Ref | str) -> Revision:
        """As :meth:`CatalogClient.pin_pack`."""
        request = requests.pack_ref_request(ref)
        return revision_from_pb(await self._call(self._stub.PinPack, request, TRANSFER_TIMEOUT))

    async def unpin_pack(self, ref: Ref | str) -> Revision:
        """As :meth:`CatalogClient.unpin_pack`."""
        request = requests.pack_ref_request(ref)
        return revision_from_pb(await self._call(self._stub.UnpinPack, request))

    async def evict_pack(self, ref: Ref | str) -> Revision:
        """As :meth:`CatalogClient.evict_pack`."""
        request = requests.pack_ref_request(ref)
        return revision_from_pb(await self._call(self._stub.EvictPack, request))

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
        request = requests.export_peft_dir_request(ref, dest, nonce, fsync, served_base, max_rank)
        return answers.exported(await self._call(self._stub.ExportPeftDir, request, timeout))

    async def list_cache(self) -> list[dict[str, Any]]:
        """As :meth:`CatalogClient.list_cache`."""
        response = await self._call(self._stub.ListCache, pb.ListCacheRequest())
        return answers.cache_entries(response)

    async def export_requests(
        self, *, since: float = 0.0, engine: str = "", timeout: float = TRANSFER_TIMEOUT
    ) -> list[dict[str, Any]]:
        """As :meth:`CatalogClient.export_requests`."""
        request = pb.ExportRequestsRequest(since=since, engine=engine)
        with translated(self.target):
            return [
                record
                async for message in self._stub.ExportRequests(request, timeout=timeout)
                for record in answers.request_records(message)
            ]

    # -- engines ----------------------------------------------------------------------------

    async def watch_hints(self, engine_id: str) -> AsyncIterator[Hint]:
        """As :meth:`CatalogClient.watch_hints`: hints until the server ends the stream or the
        iterating task is cancelled. Raises ``NotFound`` for an unregistered engine."""
        call = self._stub.WatchHints(pb.WatchHintsRequest(engine_id=engine_id))
        try:
            with translated(self.target):
                async for hint in call:
                    yield answers.hint_from_pb(hint)
        finally:
            call.cancel()

    async def register_engine(
        self, engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int = 0
    ) -> None:
        """As :meth:`CatalogClient.register_engine`."""
        request = requests.register_request(engine_id, base_id, num_slots, max_rank, host_bytes)
        await self._call(self._stub.RegisterEngine, request)

    async def report_residency(
        self,
        engine_id: str,
        gpu: list[str],
        host: list[str],
        *,
        tiers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """As :meth:`CatalogClient.report_residency`."""
        request = requests.residency_request(engine_id, gpu, host, tiers)
        await self._call(self._stub.ReportResidency, request)

    # -- lifecycle --------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """As :meth:`CatalogClient.wait_ready` (``Unavailable`` after ``timeout``)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise not_ready(self.target) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncCatalogClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
