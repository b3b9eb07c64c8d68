"""Reads of one cached pack inside an LMDB read transaction, with the checks every read makes.

The catalog's :class:`~catalog.cache.pack_cache.PackCache` and colocated engines
(:mod:`catalog.client.colocated`) read the layout of :mod:`catalog.cache.layout` through these
functions: a meta that decodes, chunks that are present and of their recorded length, and,
where a read relies on them, chunks that match their fill-time checksums. A copy that
fails any of that raises :class:`CorruptEntry` carrying the meta as read, so that the writer
drops exactly that copy (not a good refill that replaced it meanwhile).

Values are views into the map (transactions opened with ``buffers=True``), valid until the
transaction ends; every function here returns copies, never views.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from catalog.cache.layout import INDEX_BYTES, EntryMeta
from catalog.errors import InvalidArgument

if TYPE_CHECKING:
    Txn = Any  # lmdb.Transaction, opened with buffers=True


class CorruptEntry(Exception):
    """A cached copy failed a check; ``seen_meta`` is its meta as read (to drop only that)."""

    def __init__(self, why: str, seen_meta: bytes) -> None:
        super().__init__(why)
        self.seen_meta = seen_meta


@dataclass(frozen=True, slots=True)
class Tables:
    """The environment's sub-databases a read needs (handles from ``open_db``)."""

    chunks: Any
    entries: Any


def decode_meta(raw: bytes, name: str) -> EntryMeta:
    """Raises ``CorruptEntry`` for a meta that does not decode."""
    try:
        return EntryMeta.decode(raw)
    except ValueError as exc:
        raise CorruptEntry(f"meta of {name}: {exc}", raw) from None


def check_offset(offset: int, size: int, name: str) -> None:
    """Raises ``InvalidArgument`` for an offset past the end of a ``size``-byte pack."""
    if offset > size:
        raise InvalidArgument(f"offset {offset} is past the end of {name} ({size} bytes)")


def pieces(data: bytes, start: int, end: int, piece_bytes: int, name: str) -> Iterator[bytes]:
    """``data[start:end]`` (``end`` clipped to its length) in copies of ``piece_bytes``."""
    check_offset(start, len(data), name)
    view = memoryview(data)
    end = min(end, len(data))
    for at in range(start, end, piece_bytes):
        yield bytes(view[at : min(end, at + piece_bytes)])


def chunk_view(
    txn: Txn, tables: Tables, ekey: bytes, meta: EntryMeta, index: int, name: str, seen: bytes
) -> memoryview:
    """Chunk ``index`` as a view into the map (a copy read from the file, for a reference
    entry), present and of its recorded length (not yet checked against its checksum).
    Raises ``CorruptEntry``."""
    if meta.file:
        return memoryview(
            read_file_range(meta, index * meta.chunk_bytes, meta.chunk_length(index), name, seen)
        )
    view = txn.get(ekey + index.to_bytes(INDEX_BYTES, "big"), db=tables.chunks)
    if view is None or len(view) != meta.chunk_length(index):
        got = "missing" if view is None else f"{len(view)} bytes"
        raise CorruptEntry(f"chunk {index} of {name} is {got}", seen)
    return memoryview(view)


def read_file_range(meta: EntryMeta, start: int, length: int, name: str, seen: bytes) -> bytes:
    """``length`` bytes from ``start`` of a reference entry's file. Raises ``CorruptEntry``
    when the file is gone or shorter than the meta says."""
    try:
        with open(meta.file, "rb") as f:
            data = os.pread(f.fileno(), length, start)
    except OSError as exc:
        raise CorruptEntry(f"the file of {name} ({meta.file}): {exc.strerror}", seen) from None
    if len(data) != length:
        raise CorruptEntry(f"the file of {name} ({meta.file}) is shorter than it was", seen)
    return data


def read_meta(txn: Txn, tables: Tables, ekey: bytes, name: str) -> EntryMeta | None:
    """The entry's meta; ``None`` when not cached. Raises ``CorruptEntry``."""
    raw = txn.get(ekey, db=tables.entries)
    return None if raw is None else decode_meta(bytes(raw), name)


def read_whole(txn: Txn, tables: Tables, ekey: bytes, name: str) -> tuple[bytes, bytes] | None:
    """``(pack bytes, meta as read)``, chunks joined but not checked (the caller hashes the
    whole pack after the transaction); ``None`` when not cached. Raises ``CorruptEntry``."""
    raw = txn.get(ekey, db=tables.entries)
    if raw is None:
        return None
    seen = bytes(raw)
    meta = decode_meta(seen, name)
    if meta.file:
        return read_file_range(meta, 0, meta.size, name, seen), seen
    views = [
        chunk_view(txn, tables, ekey, meta, index, name, seen) for index in range(meta.chunk_count)
    ]
    return b"".join(views), seen  # the one copy out of the map


def read_span(
    txn: Txn, tables: Tables, ekey: bytes, offset: int, length: int, name: str
) -> bytes | None:
    """Bytes ``[offset, offset + length)``, each touched chunk checked against its checksum;
    ``None`` when not cached. Raises ``CorruptEntry``, ``InvalidArgument`` (offset past the
    end)."""
    raw = txn.get(ekey, db=tables.entries)
    if raw is None:
        return None
    seen = bytes(raw)
    meta = decode_meta(seen, name)
    check_offset(offset, meta.size, name)
    end = min(meta.size, offset + length)
    if end <= offset:
        return b""
    size = meta.chunk_bytes
    parts = []
    for index in range(offset // size, (end - 1) // size + 1):
        view = chunk_view(txn, tables, ekey, meta, index, name, seen)
        if not meta.matches(index, view):
            raise CorruptEntry(f"chunk {index} of {name} fails its checksum", seen)
        start = index * size
        parts.append(view[max(offset, start) - start : min(end, start + size) - start])
    return b"".join(parts)


def read_chunk_pieces(
    txn: Txn,
    tables: Tables,
    ekey: bytes,
    name: str,
    *,
    cached: EntryMeta,
    position: int,
    end: int,
    piece_bytes: int,
) -> list[bytes] | None:
    """Copies of the chunk holding ``position``, from there up to ``end``, checked against its
    checksum and cut into pieces; ``None`` when the entry ``cached`` describes is gone (a
    refill of the same digest with the same chunks counts as the same entry: its pins and
    insertion time may differ). Raises ``CorruptEntry``."""
    index = position // cached.chunk_bytes
    start = index * cached.chunk_bytes
    stop = min(end, start + cached.chunk_bytes)
    raw = txn.get(ekey, db=tables.entries)
    if raw is None:
        return None
    seen = bytes(raw)
    if not decode_meta(seen, name).same_bytes(cached):
        return None
    view = chunk_view(txn, tables, ekey, cached, index, name, seen)
    if not cached.matches(index, view):
        raise CorruptEntry(f"chunk {index} of {name} fails its checksum", seen)
    return [
        bytes(view[at - start : min(stop, at + piece_bytes) - start])
        for at in range(position, stop, piece_bytes)
    ]
