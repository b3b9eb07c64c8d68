"""The requests both clients send, built in one place, and the settings they share.

Each client keeps only its transport (a stub call, or an awaited one); what goes into a request,
and the local checks that refuse bad input before a round trip, are the same for both.
``catalog.client.answers`` turns the responses back into model types.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.digest import DEFAULT_ALGORITHM, Digest, new_hasher
from catalog.errors import InvalidArgument
from catalog.model import AdapterName, PushProvenance, Ref, Revision

#: The deadline of a call that moves no pack bytes.
DEFAULT_TIMEOUT = 30.0
#: The deadline of a call that moves a pack, or walks the whole catalog (gc, verify, reindex).
TRANSFER_TIMEOUT = 3600.0
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
#: A push's options as :func:`push_header` takes them: base_id, aliases, metadata, provenance.
PushOptions = tuple[str, list[str] | tuple[str, ...], dict[str, str] | None, PushProvenance | None]


def adapter_text(name: AdapterName | str) -> str:
    """``name`` checked and written as the server reads it. Raises ``InvalidName``."""
    return str(AdapterName.parse(name) if isinstance(name, str) else name)


def ref_text(ref: Ref | Revision | str) -> str:
    """``ref`` as the server reads it. Raises ``InvalidReference``."""
    if isinstance(ref, Revision):
        return str(ref.ref)
    if isinstance(ref, Ref):
        return str(ref)
    return str(Ref.parse(ref))  # validate locally: a bad reference never costs a round trip


def pinned_ref(revision: Revision) -> str:
    """The reference that names ``revision`` by its digest: an alias moved meanwhile cannot
    change which bytes it names."""
    return f"{revision.adapter}@{revision.digest}"


def check_range(offset: int, length: int) -> None:
    """Raises ``InvalidArgument`` for a negative ``offset`` or ``length``."""
    if offset < 0 or length < 0:
        raise InvalidArgument("offset and length must be >= 0")


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
    this machine's name. Raises ``InvalidName``."""
    stated = provenance or PushProvenance()
    return pb.PushHeader(
        name=adapter_text(name),
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


def streamed_push_header(
    name: AdapterName | str, pack: PackSource, options: PushOptions
) -> pb.PushHeader:
    """The header of a push over the byte stream: the pack's size and digest are computed here
    first and stated, so the server refuses a corrupted transfer. Raises ``InvalidName``,
    ``OSError`` (an unreadable pack file)."""
    size, digest = source_size_and_digest(pack)
    return push_header(name, size, digest, *options)


def alias_request(
    name: AdapterName | str, alias: str, revision: int | str, expected: int | None = None
) -> pb.SetAliasRequest:
    """A move of ``alias`` to a revision number, or to a number/alias/digest given as text;
    ``expected``: the revision it must point at now. Raises ``InvalidName``."""
    adapter = adapter_text(name)
    if isinstance(revision, int):
        request = pb.SetAliasRequest(name=adapter, alias=alias, revision=revision)
    elif revision.isdigit():
        request = pb.SetAliasRequest(name=adapter, alias=alias, revision=int(revision))
    else:
        request = pb.SetAliasRequest(name=adapter, alias=alias, target=revision)
    if expected is not None:
        request.expected_revision = expected
    return request


def rollback_request(
    name: AdapterName | str, alias: str, expected: int | None, to: int | str
) -> pb.RollbackRequest:
    """A move of ``alias`` one step back (``to`` empty) or to ``to``. Raises ``InvalidName``."""
    request = pb.RollbackRequest(name=adapter_text(name), alias=alias, to=str(to) if to else "")
    if expected is not None:
        request.expected_revision = expected
    return request


def list_adapters_request(
    prefix: str,
    page_size: int,
    page_token: str,
    base_id: str,
    tags: dict[str, str] | None,
    alias: str,
) -> pb.ListAdaptersRequest:
    return pb.ListAdaptersRequest(
        prefix=prefix,
        page_size=page_size,
        page_token=page_token,
        base_id=base_id,
        tags=dict(tags or {}),
        alias=alias,
    )


def list_revisions_request(
    name: AdapterName | str, page_size: int, page_token: str
) -> pb.ListRevisionsRequest:
    """Raises ``InvalidName``."""
    return pb.ListRevisionsRequest(
        name=adapter_text(name), page_size=page_size, page_token=page_token
    )


def set_metadata_request(
    ref: Ref | str, metadata: dict[str, str] | None, remove: list[str] | tuple[str, ...]
) -> pb.SetMetadataRequest:
    """Raises ``InvalidReference``."""
    return pb.SetMetadataRequest(
        ref=ref_text(ref), metadata=dict(metadata or {}), remove=list(remove)
    )


def export_peft_dir_request(
    ref: Ref | Revision | str,
    dest: str | Path,
    nonce: str,
    fsync: bool,
    served_base: str,
    max_rank: int,
) -> pb.ExportPeftDirRequest:
    """Raises ``InvalidReference``."""
    return pb.ExportPeftDirRequest(
        ref=ref_text(ref),
        dest=str(dest),
        nonce=nonce,
        fsync=fsync,
        served_base=served_base,
        max_rank=max_rank,
    )


def prefetch_request(refs: list[str], priority: int, deadline_s: float) -> pb.PrefetchRequest:
    """Raises ``InvalidReference`` (any of ``refs``)."""
    return pb.PrefetchRequest(
        refs=[ref_text(r) for r in refs], priority=priority, deadline_s=deadline_s
    )


def register_request(
    engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int
) -> pb.RegisterEngineRequest:
    return pb.RegisterEngineRequest(
        engine_id=engine_id,
        base_id=base_id,
        num_slots=num_slots,
        max_rank=max_rank,
        host_bytes=host_bytes,
    )


def residency_request(
    engine_id: str, gpu: list[str], host: list[str], tiers: Sequence[Mapping[str, Any]]
) -> pb.ReportResidencyRequest:
    """Raises ``InvalidReference`` for an entry of ``gpu`` or ``host`` that is not a digest,
    ``ValueError`` for a tier field ``pb.TierStats`` does not have."""
    for text in (*gpu, *host):
        Digest.parse(text)
    return pb.ReportResidencyRequest(
        engine_id=engine_id,
        gpu=gpu,
        host=host,
        tiers=[pb.TierStats(**tier) for tier in tiers],
    )


def pack_ref_request(ref: Ref | str) -> pb.PackRefRequest:
    """Raises ``InvalidReference``."""
    return pb.PackRefRequest(ref=ref_text(ref))
