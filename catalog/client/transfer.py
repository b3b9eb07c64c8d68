"""Receiving a pack from ``FetchPack``: each chunk's bytes copied once, into one buffer.

The generated stub is bypassed for this one method. protobuf's Python runtime copies a ``bytes``
field when it parses a message and again each time the field is read, and a fetch then copied
every chunk into its buffer and the buffer into the returned ``bytes``: five passes over the
pack besides the digest, where one pass costs about as much as the transfer itself (memory
copies run at ~2 GB/s on the machines we measured, and first touches of fresh pages cost as
much again). Here the stub hands over each message's raw bytes, :func:`decode_chunk` finds the
three fields of ``PackChunk`` without copying, and :class:`PackReceiver` copies the data into
its place in one buffer and feeds the digest while the bytes are still in cache.

What a fetch returns is a read-only ``memoryview`` of that buffer: no other reference to the
buffer exists, so the bytes never change (the engine may keep views into them instead of
copying; see ``engine_plugin.sources.PackSource``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.atomic_files import write_atomically
from catalog.convert import revision_from_pb
from catalog.digest import Digest, Hasher, new_hasher
from catalog.errors import DataLoss
from catalog.hostmem import new_buffer
from catalog.model import Revision

#: The full name of the method the raw stubs call (``catalog.proto``'s ``Catalog.FetchPack``).
FETCH_PACK_METHOD = "/loracat.v1.Catalog/FetchPack"
#: ``PackChunk``'s field numbers (see ``catalog.proto``).
_OFFSET, _DATA, _REVISION = 1, 2, 3
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_WIRE_TYPES = {_OFFSET: _VARINT, _DATA: _LENGTH_DELIMITED, _REVISION: _LENGTH_DELIMITED}


def serialize_request(request: pb.FetchPackRequest) -> bytes:
    return request.SerializeToString()


def raw_fetch_pack(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """``FetchPack`` on ``channel`` (sync or asyncio), its messages handed over undecoded for
    :class:`PackReceiver`."""
    return channel.unary_stream(
        FETCH_PACK_METHOD, request_serializer=serialize_request, response_deserializer=None
    )


def fetch_request(receiver: PackReceiver) -> pb.FetchPackRequest:
    """The request for the range ``receiver`` expects."""
    return pb.FetchPackRequest(ref=receiver.ref, offset=receiver.offset, length=receiver.length)


def write_pack_file(dest: Path, data: memoryview) -> None:
    """Write ``data`` to ``dest`` through a temporary name renamed into place, so ``dest``
    never holds part of a pack (nor is a temporary file left beside it). Raises ``OSError``."""
    # No fsync (none before either): the caller's copy of a pack the catalog keeps durably.
    write_atomically(dest, data, fsync=False)


def _varint(raw: memoryview, pos: int, ref: str) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it."""
    result = shift = 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise DataLoss(f"fetch of {ref}: a malformed chunk (a varint runs past its end)")


def decode_chunk(raw: bytes, ref: str) -> tuple[int, memoryview, memoryview | None]:
    """``(offset, data, serialized revision or None)`` of a serialized ``PackChunk``, the last
    two as views into ``raw``. Fields this version does not know are skipped, as protobuf does.

    Raises ``DataLoss`` for bytes that are not a well-formed ``PackChunk``.
    """
    view = memoryview(raw)
    offset, data, revision = 0, view[0:0], None
    pos = 0
    while pos < len(view):
        key, pos = _varint(view, pos, ref)
        field, wire = key >> 3, key & 7
        if _WIRE_TYPES.get(field, wire) != wire:
            raise DataLoss(f"fetch of {ref}: a malformed chunk (field {field}, wire type {wire})")
        if wire == _VARINT:
            value, pos = _varint(view, pos, ref)
            if field == _OFFSET:
                offset = value
        elif wire == _LENGTH_DELIMITED:
            size, pos = _varint(view, pos, ref)
            end = pos + size
            if end > len(view):
                raise DataLoss(f"fetch of {ref}: a malformed chunk (field {field} is truncated)")
            if field == _DATA:
                data = view[pos:end]
            elif field == _REVISION:
                revision = view[pos:end]
            pos = end
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise DataLoss(f"fetch of {ref}: a malformed chunk (wire type {wire})")
    if pos != len(view):
        raise DataLoss(f"fetch of {ref}: a malformed chunk (a fixed field is truncated)")
    return offset, data, revision


class PackReceiver:
    """The chunks of one ``FetchPack`` call, placed into one buffer as they arrive.

    ``PackReceiver(ref, offset, length)`` for a request of ``length`` bytes from ``offset``
    (0: to the end); ``add`` each raw message in the order received, then ``result``. The
    server sends the chunks of a range in order, back to back, the first carrying the revision;
    anything else is ``DataLoss``. A whole pack (``offset`` 0, to its end) is checked against
    its digest as it arrives, when ``verify``.

    ``into``: a writable buffer to fill instead of a new one (its length must be the range's:
    a parallel fetch gives each range its slice of the whole pack's buffer).
    """

    def __init__(
        self,
        ref: str,
        offset: int,
        length: int,
        *,
        verify: bool = True,
        into: memoryview | None = None,
    ) -> None:
        self.ref = ref
        self.offset = offset
        self.length = length
        self.verify = verify
        self.revision: Revision | None = None
        #: Bytes placed so far (the range's first ``received`` bytes).
        self.received = 0
        self._into = into
        self._buffer: memoryview = memoryview(bytearray())
        self._hasher: Hasher | None = None

    @property
    def expected(self) -> int:
        """The range's size in bytes (known from the first chunk; 0 before it)."""
        return len(self._buffer)

    def add(self, raw: bytes) -> int:
        """Place one serialized ``PackChunk``; returns how many data bytes it carried.

        Raises ``DataLoss``: a malformed chunk, a first chunk without the revision (or a later
        one with one), a chunk out of order or past the range's end.
        """
        offset, data, revision = decode_chunk(raw, self.ref)
        if self.revision is None:
            if revision is None:
                raise DataLoss(f"fetch of {self.ref}: the server sent no revision")
            self._start(revision_from_pb(pb.Revision.FromString(bytes(revision))))
        elif revision is not None:
            raise DataLoss(f"fetch of {self.ref}: a second revision in one stream")
        expected_at = self.offset + self.received
        end = self.received + len(data)
        if offset != expected_at or end > len(self._buffer):
            raise DataLoss(
                f"fetch of {self.ref}: a {len(data)}-byte chunk at {offset}, expected one at "
                f"{expected_at} within {self.offset}+{len(self._buffer)}"
            )
        self._buffer[self.received : end] = data
        if self._hasher is not None:
            self._hasher.update(data)
        self.received = end
        return len(data)

    def result(self) -> tuple[Revision, memoryview]:
        """The revision and the range's bytes (a read-only view).

        Raises ``DataLoss``: no revision, fewer bytes than the range holds, or (checked) bytes
        that do not hash to the revision's digest.
        """
        revision = self.revision
        if revision is None:
            raise DataLoss(f"fetch of {self.ref}: the server sent no revision")
        if self.received != len(self._buffer):
            raise DataLoss(
                f"fetch of {self.ref}: the stream ended after {self.received} of "
                f"{len(self._buffer)} bytes"
            )
        if self._hasher is not None:
            actual = Digest(revision.digest.algorithm, self._hasher.hexdigest())
            if actual != revision.digest:
                raise DataLoss(
                    f"fetch of {self.ref}: received bytes hash to {actual}, "
                    f"expected {revision.digest}"
                )
        return revision, self._buffer.toreadonly()

    def _start(self, revision: Revision) -> None:
        self.revision = revision
        end = revision.size_bytes
        if self.length:
            end = min(end, self.offset + self.length)
        size = max(0, end - self.offset)
        if self._into is None:
            self._buffer = memoryview(new_buffer(size))
        elif len(self._into) == size:
            self._buffer = self._into
        else:
            raise DataLoss(
                f"fetch of {self.ref}: the server's revision holds {size} bytes from "
                f"{self.offset}, the buffer {len(self._into)}"
            )
        if self.verify and self.offset == 0 and size == revision.size_bytes:
            self._hasher = new_hasher(revision.digest.algorithm)
