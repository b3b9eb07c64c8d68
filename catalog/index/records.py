"""Compact binary values of the LMDB index: fixed ``struct`` layouts plus a short JSON tail.

Strings that repeat across revisions (digest algorithm, ``base_id``, ``dtype``, the tuple of target
module names) are stored once in an intern table and referenced by a 4-byte id, so a revision
record is ~85 bytes plus its metadata. Every value starts with a format byte so a later layout can
be told apart from this one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

from catalog.digest import Digest
from catalog.errors import DataLoss
from catalog.index.base import AdapterState
from catalog.index.rules import PackSummary, edited_metadata
from catalog.model import AdapterName, Revision

RECORD_FORMAT = 1

Interned = str | tuple[str, ...]
InternLookup = Callable[[int], Interned]

# format, next_seq, next_revision, latest, live revisions, created_at, updated_at
_ADAPTER = struct.Struct(">BQQIIdd")
# format, algorithm id, digest length (the raw digest follows)
_REVISION_HEAD = struct.Struct(">BHB")
# size_bytes, created_at, rank, alpha, num_layers, num_experts, base_id id, dtype id, modules id
_REVISION_BODY = struct.Struct(">QdIdIIIII")
# previous, revision, at
_MOVE = struct.Struct(">IId")
_NUMBER = struct.Struct(">I")


@dataclass(slots=True)
class AdapterRecord:
    """The per-adapter counters; mutable because a write batch updates it in place."""

    next_seq: int
    next_revision: int
    latest: int
    live: int
    created_at: float
    updated_at: float

    @classmethod
    def new(cls, at: float) -> AdapterRecord:
        return cls(next_seq=1, next_revision=1, latest=0, live=0, created_at=at, updated_at=at)

    def encode(self) -> bytes:
        return _ADAPTER.pack(
            RECORD_FORMAT,
            self.next_seq,
            self.next_revision,
            self.latest,
            self.live,
            self.created_at,
            self.updated_at,
        )

    @classmethod
    def decode(cls, value: bytes) -> AdapterRecord:
        try:
            fmt, *fields = _ADAPTER.unpack(value)
        except struct.error as exc:
            raise DataLoss(f"corrupt adapter record in the index: {exc}") from None
        if fmt != RECORD_FORMAT:
            raise DataLoss(f"adapter record has unknown format {fmt}")
        return cls(*fields)

    def state(self, adapter: AdapterName, aliases: dict[str, int]) -> AdapterState:
        return AdapterState(
            adapter=adapter,
            next_seq=self.next_seq,
            next_revision=self.next_revision,
            latest=self.latest,
            live_revisions=self.live,
            aliases=aliases,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


def encode_revision(
    *,
    algorithm_id: int,
    digest_raw: bytes,
    size_bytes: int,
    created_at: float,
    summary: PackSummary,
    base_id_id: int,
    dtype_id: int,
    modules_id: int,
    metadata: dict[str, str],
) -> bytes:
    return b"".join(
        (
            _REVISION_HEAD.pack(RECORD_FORMAT, algorithm_id, len(digest_raw)),
            digest_raw,
            _REVISION_BODY.pack(
                size_bytes,
                created_at,
                summary.rank,
                summary.alpha,
                summary.num_layers,
                summary.num_experts,
                base_id_id,
                dtype_id,
                modules_id,
            ),
            _encode_metadata(metadata),
        )
    )


def _encode_metadata(metadata: dict[str, str]) -> bytes:
    if not metadata:
        return b""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _split_revision(value: bytes) -> tuple[int, bytes, int]:
    """(algorithm id, raw digest, offset of the body)."""
    try:
        fmt, algorithm_id, width = _REVISION_HEAD.unpack_from(value)
    except struct.error as exc:
        raise DataLoss(f"corrupt revision record in the index: {exc}") from None
    if fmt != RECORD_FORMAT:
        raise DataLoss(f"revision record has unknown format {fmt}")
    start = _REVISION_HEAD.size
    return algorithm_id, value[start : start + width], start + width


def revision_digest(value: bytes, lookup: InternLookup) -> tuple[str, bytes]:
    """(algorithm, raw digest) of a revision record."""
    algorithm_id, raw, _ = _split_revision(value)
    return str(lookup(algorithm_id)), raw


def decode_revision(
    adapter: AdapterName,
    number: int,
    value: bytes,
    lookup: InternLookup,
    aliases: tuple[str, ...],
) -> Revision:
    algorithm_id, raw, body = _split_revision(value)
    try:
        (
            size_bytes,
            created_at,
            rank,
            alpha,
            num_layers,
            num_experts,
            base_id_id,
            dtype_id,
            modules_id,
        ) = _REVISION_BODY.unpack_from(value, body)
        tail = value[body + _REVISION_BODY.size :]
        metadata: dict[str, str] = json.loads(tail.decode()) if tail else {}
    except (struct.error, ValueError) as exc:
        raise DataLoss(f"corrupt revision record {adapter}@{number} in the index: {exc}") from None
    modules = lookup(modules_id)
    return Revision(
        adapter=adapter,
        number=number,
        digest=Digest(str(lookup(algorithm_id)), raw.hex()),
        base_id=str(lookup(base_id_id)),
        rank=rank,
        alpha=alpha,
        dtype=str(lookup(dtype_id)),
        size_bytes=size_bytes,
        created_at=created_at,
        target_modules=modules if isinstance(modules, tuple) else (modules,),
        num_layers=num_layers,
        num_experts=num_experts,
        aliases=aliases,
        metadata=metadata,
    )


def merge_metadata(value: bytes, update: dict[str, str], removed: tuple[str, ...] = ()) -> bytes:
    """The same revision record with ``update`` merged into its metadata, ``removed`` dropped."""
    _, _, body = _split_revision(value)
    end = body + _REVISION_BODY.size
    tail = value[end:]
    try:
        metadata: dict[str, str] = json.loads(tail.decode()) if tail else {}
    except ValueError as exc:
        raise DataLoss(f"corrupt revision metadata in the index: {exc}") from None
    return value[:end] + _encode_metadata(edited_metadata(metadata, update, removed))


def encode_move(previous: int, revision: int, at: float, principal: str = "") -> bytes:
    """An alias move; the principal who made it follows the fixed part as UTF-8."""
    return _MOVE.pack(previous, revision, at) + principal.encode()


def decode_move(value: bytes) -> tuple[int, int, float, str]:
    try:
        previous, revision, at = _MOVE.unpack_from(value)
        principal = value[_MOVE.size :].decode()
    except (struct.error, UnicodeDecodeError) as exc:
        raise DataLoss(f"corrupt alias history entry in the index: {exc}") from None
    return previous, revision, at, principal


def encode_number(number: int) -> bytes:
    return _NUMBER.pack(number)


def decode_number(value: bytes) -> int:
    return int.from_bytes(value, "big")


def encode_numbers(numbers: list[int]) -> bytes:
    return b"".join(_NUMBER.pack(n) for n in numbers)


def decode_numbers(value: bytes) -> list[int]:
    return [n for (n,) in _NUMBER.iter_unpack(value)]


def encode_interned(value: Interned) -> str:
    """The canonical text of an interned value: a JSON string or a JSON list of strings."""
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def decode_interned(text: bytes | str) -> Interned:
    value = json.loads(text)
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return str(value)
