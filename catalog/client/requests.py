"""Request building and response decoding shared by the sync and asyncio clients."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.digest import DEFAULT_ALGORITHM, Digest, new_hasher
from catalog.errors import InvalidArgument
from catalog.model import AdapterName, PushProvenance, Ref, Revision

PUSH_CHUNK_BYTES = 1 << 20
MAX_CHANNEL_MESSAGE = 8 << 20
#: The longest a channel waits between attempts to reach a catalog that went away. gRPC's own
#: backoff grows to 120 s, failing calls fast meanwhile, so a catalog restarted after a few
#: seconds' outage stayed unreachable to its clients for seconds more (a vLLM resolve answered
#: 503 after the catalog was back). A catalog is a near neighbour; a 1 s retry costs nothing.
MAX_RECONNECT_BACKOFF_MS = 1000
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHANNEL_MESSAGE),
    ("grpc.max_send_message_length", MAX_CHANNEL_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]


@dataclass(frozen=True, slots=True)
class PushResult:
    revision: Revision
    created: bool  # False: an identical live revision existed and is returned


PackSource = bytes | bytearray | memoryview | Path
ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


def source_size_and_digest(source: PackSource) -> tuple[int, Digest]:
    hasher = new_hasher(DEFAULT_ALGORITHM)
    if isinstance(source, Path):
        size = 0
        with open(source, "rb") as f:
            while block := f.read(8 << 20):
                hasher.update(block)
                size += len(block)
    else:
        hasher.update(source)
        size = len(source)
    return size, Digest(DEFAULT_ALGORITHM, hasher.hexdigest())


def push_requests(
    source: PackSource,
    header: pb.PushHeader,
    chunk_bytes: int = PUSH_CHUNK_BYTES,
    progress: ProgressCallback | None = None,
) -> Iterator[pb.PushRequest]:
    yield pb.PushRequest(header=header)
    sent = 0
    if isinstance(source, Path):
        with open(source, "rb") as f:
            while block := f.read(chunk_bytes):
                yield pb.PushRequest(chunk=block)
                sent += len(block)
                if progress:
                    progress(sent, header.size_bytes)
        return
    view = memoryview(source)
    for start in range(0, len(view), chunk_bytes):
        block = bytes(view[start : start + chunk_bytes])
        yield pb.PushRequest(chunk=block)
        sent += len(block)
        if progress:
            progress(sent, header.size_bytes)


def push_header(
    name: AdapterName | str,
    size: int,
    digest: Digest | None,
    base_id: str,
    aliases: list[str] | tuple[str, ...],
    metadata: dict[str, str] | None,
    provenance: PushProvenance | None = None,
) -> pb.PushHeader:
    """The header of a push (``digest`` None: none stated); provenance's ``host`` defaults to
    this machine's name."""
    adapter = AdapterName.parse(name) if isinstance(name, str) else name
    stated = provenance or PushProvenance()
    return pb.PushHeader(
        name=str(adapter),
        base_id=base_id,
        aliases=list(aliases),
        metadata=dict(metadata or {}),
        size_bytes=size,
        expected_digest=str(digest) if digest is not None else "",
        host=stated.host or socket.gethostname(),
        run_id=stated.run_id,
        parent=stated.parent,
        data_digest=stated.data_digest,
        eval=dict(stated.eval),
    )


def alias_request(name: AdapterName | str, alias: str, revision: int | str) -> pb.SetAliasRequest:
    """A move of ``alias`` to a revision number, or to a number/alias/digest given as text."""
    adapter = str(AdapterName.parse(name) if isinstance(name, str) else name)
    if isinstance(revision, int):
        return pb.SetAliasRequest(name=adapter, alias=alias, revision=revision)
    if revision.isdigit():
        return pb.SetAliasRequest(name=adapter, alias=alias, revision=int(revision))
    return pb.SetAliasRequest(name=adapter, alias=alias, target=revision)


def ref_text(ref: Ref | Revision | str) -> str:
    if isinstance(ref, Revision):
        return str(ref.ref)
    if isinstance(ref, Ref):
        return str(ref)
    return str(Ref.parse(ref))  # validate locally: a bad reference never costs a round trip


def check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise InvalidArgument("offset and length must be >= 0")
