"""The asyncio twin of :class:`catalog.client.CatalogClient` (same methods, awaitable)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.client.channel import channel_settings, open_aio_channel
from catalog.client.errors import translated
from catalog.client.requests import (
    PackSource,
    PushResult,
    check_range,
    push_header,
    push_requests,
    ref_text,
    source_size_and_digest,
)
from catalog.client.sync import DEFAULT_TIMEOUT, TRANSFER_TIMEOUT, _name
from catalog.client.transfer import FETCH_PACK_METHOD, PackReceiver, serialize_request
from catalog.convert import move_from_pb, revision_from_pb, summary_from_pb
from catalog.model import AdapterName, AdapterSummary, AliasMove, Page, Ref, Revision


class AsyncCatalogClient:
    """``async with AsyncCatalogClient("127.0.0.1:7070") as c: await c.resolve("t/n")``."""

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
        timeout: float = TRANSFER_TIMEOUT,
    ) -> PushResult:
        size, digest = source_size_and_digest(pack)
        header = push_header(name, size, digest, base_id, aliases, metadata)
        with translated(self.target):
            response = await self._stub.Push(push_requests(pack, header), timeout=timeout)
        return PushResult(revision_from_pb(response.revision), response.created)

    async def resolve(self, ref: Ref | str) -> Revision:
        with translated(self.target):
            msg = await self._stub.Resolve(
                pb.ResolveRequest(ref=ref_text(ref)), timeout=self.timeout
            )
        return revision_from_pb(msg)

    async def list_adapters(
        self, prefix: str = "", *, page_size: int = 100, page_token: str = ""
    ) -> Page[AdapterSummary]:
        with translated(self.target):
            response = await self._stub.ListAdapters(
                pb.ListAdaptersRequest(prefix=prefix, page_size=page_size, page_token=page_token),
                timeout=self.timeout,
            )
        return Page(tuple(summary_from_pb(s) for s in response.adapters), response.next_page_token)

    async def iter_adapters(
        self, prefix: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[AdapterSummary]:
        token = ""
        while True:
            page = await self.list_adapters(prefix, page_size=page_size, page_token=token)
            for item in page.items:
                yield item
            if not page.next_token:
                return
            token = page.next_token

    async def list_revisions(
        self, name: AdapterName | str, *, page_size: int = 100, page_token: str = ""
    ) -> Page[Revision]:
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

    async def set_alias(
        self, name: AdapterName | str, alias: str, revision: int, *, expected: int | None = None
    ) -> AliasMove:
        request = pb.SetAliasRequest(name=_name(name), alias=alias, revision=revision)
        if expected is not None:
            request.expected_revision = expected
        with translated(self.target):
            return move_from_pb(await self._stub.SetAlias(request, timeout=self.timeout))

    async def rollback(
        self, name: AdapterName | str, alias: str, *, expected: int | None = None
    ) -> AliasMove:
        request = pb.RollbackRequest(name=_name(name), alias=alias)
        if expected is not None:
            request.expected_revision = expected
        with translated(self.target):
            return move_from_pb(await self._stub.Rollback(request, timeout=self.timeout))

    async def delete(self, ref: Ref | str, *, all_revisions: bool = False) -> list[int]:
        with translated(self.target):
            response = await self._stub.Delete(
                pb.DeleteRequest(ref=ref_text(ref), all_revisions=all_revisions),
                timeout=self.timeout,
            )
        return list(response.deleted)

    async def fetch_with_revision(
        self,
        ref: Ref | Revision | str,
        *,
        offset: int = 0,
        length: int = 0,
        verify: bool = True,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> tuple[Revision, memoryview]:
        """As :meth:`CatalogClient.fetch_with_revision` (one stream)."""
        check_range(offset, length)
        receiver = PackReceiver(ref_text(ref), offset, length, verify=verify)
        request = pb.FetchPackRequest(ref=receiver.ref, offset=offset, length=length)
        with translated(self.target):
            async for raw in self._fetch_pack(request, timeout=timeout):
                receiver.add(raw)
        return receiver.result()

    async def fetch(self, ref: Ref | Revision | str, **options: Any) -> memoryview:
        """As :meth:`CatalogClient.fetch`: a read-only view of the verified pack bytes."""
        return (await self.fetch_with_revision(ref, **options))[1]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncCatalogClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
