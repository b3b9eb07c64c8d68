"""The NVMe tier's on-disk layout: what the catalog writes and colocated engines read.

One LMDB environment per directory; the catalog's :class:`~catalog.cache.pack_cache.PackCache`
is its only writer, and engines on the same host may open it read-only
(:mod:`catalog.client.colocated`), so everything both sides must agree on lives here::

    chunks   entry key + u32 big-endian chunk index -> chunk bytes (``chunk_bytes`` each, the
             last one shorter)
    entries  entry key -> meta: format, codec, size, chunk_bytes, chunk count, insert time
             (unix ns), pin count, (format 3) a flags byte, then one checksum per chunk
             (formats 2 and 3: 16-byte XXH3-128; format 1, written before 2026-12-04 and still
             read: 32-byte BLAKE3); for a reference entry (codec 1) the absolute path of the
             durable tier's file follows
    info     b"schema" -> schema version; b"instance" -> a random id naming this environment
             (a reader checks it, so that a path that names another directory on another host
             or in another mount namespace is never taken for the catalog's cache)

An entry key is ``algorithm:`` followed by the raw digest bytes (``sha256:`` + 32 bytes), so
every chunk key of a pack starts with its entry key and no other pack's key does, and chunks
sort in index order.

Chunk checksums detect corruption of the tier (a flipped bit, a torn or misplaced write, a
store file changed under a reference), not forgery: the bytes enter the tier only after they
matched the revision's cryptographic digest, and whoever can rewrite a chunk in the environment
can rewrite its checksum beside it. So they are XXH3-128 (random corruption passes one with
probability 2^-128) at ~45 GB/s on one core, where BLAKE3 ran at ~7 GB/s: every colocated
attach checks every chunk of its pack, and at 16.8 MB that was 2.3 ms against 0.4 ms. The one
thing BLAKE3 caught that XXH3 does not: a deliberate edit of a referenced store file by someone
who may write the catalog's store but not its tier. An engine from before format 2 reads a
format-2 meta as corrupt (and, after the catalog's refill, refuses it with DATA_LOSS): upgrade
engines with their catalog.

Flag ``FLAG_VALUES_FINITE`` (format 3): the catalog checked, when it filled the entry, that
every tensor of the pack holds finite values only (``catalog.pack.finite``), on the very bytes
whose chunk checksums this meta records. An engine that checks every chunk against those
checksums then has the checked bytes, and may skip its own finite pass over tensors it stages
unconverted (``engine_plugin.staging``); a meta without the flag (formats 1 and 2, or a pack
that failed or could not be checked) leaves the check to the engine, as before. What this
trusts is what the checksums already trust: the tier's writer, and the store's files behind
reference entries against random corruption (not against a deliberate edit that keeps the
XXH3 checksums, see above). An engine from before format 3 reads a format-3 meta as corrupt.

A reference entry has no chunks: its bytes are the durable tier's own file (a ``file://`` store
on the cache's filesystem keeps every pack as an immutable file, written once under a temporary
name and renamed into place), so the tier does not hold a second copy. Its checksums are those
of the file's chunks, checked on every read as for stored chunks.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import blake3
import xxhash

from catalog.digest import Digest

__all__ = [
    "CHECKSUM_BYTES",
    "CHECKSUM_BYTES_BY_FORMAT",
    "CHUNKS_DB",
    "CODEC_FILE",
    "CODEC_RAW",
    "DATA_FILE",
    "DEFAULT_CHUNK_BYTES",
    "ENTRIES_DB",
    "FLAG_VALUES_FINITE",
    "INDEX_BYTES",
    "INFO_DB",
    "INSTANCE_KEY",
    "MAX_CHUNK_BYTES",
    "MAX_INDEX",
    "MIN_CHUNK_BYTES",
    "SCHEMA_KEY",
    "SCHEMA_VERSION",
    "EntryMeta",
    "checksum",
    "chunk_key",
    "digest_of_key",
    "entry_key",
    "host_id",
]

#: Bytes per stored chunk: the unit a ranged read fetches and checks.
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 256
MAX_CHUNK_BYTES = 1 << 30
SCHEMA_VERSION = 1

CHUNKS_DB = b"chunks"
ENTRIES_DB = b"entries"
INFO_DB = b"info"
SCHEMA_KEY = b"schema"
INSTANCE_KEY = b"instance"
DATA_FILE = "data.mdb"

#: Checksum bytes per chunk, by meta format.
CHECKSUM_BYTES_BY_FORMAT = {1: 32, 2: 16, 3: 16}
CHECKSUM_BYTES = CHECKSUM_BYTES_BY_FORMAT[3]
INDEX_BYTES = 4
MAX_INDEX = (1 << (8 * INDEX_BYTES)) - 1

_FORMAT = 3  # XXH3-128 checksums and a flags byte; formats 1 (BLAKE3) and 2 are still read
CODEC_RAW = 0  # chunks stored in the environment (room for a compressed codec later)
CODEC_FILE = 1  # no chunks: the bytes are the file whose path ends the meta
_META = struct.Struct(">BBQIIQI")  # format, codec, size, chunk_bytes, count, inserted_ns, pins
_FLAGS = struct.Struct(">B")  # format 3: after the header
#: Format 3 flag: the pack's values were checked finite when the entry was filled.
FLAG_VALUES_FINITE = 1


def entry_key(digest: Digest) -> bytes:
    """The key of ``digest``'s meta, and the prefix of every one of its chunk keys."""
    return digest.algorithm.encode() + b":" + bytes.fromhex(digest.hex)


def chunk_key(digest: Digest, index: int) -> bytes:
    """The key of chunk ``index`` (from 0) of ``digest``'s pack."""
    return entry_key(digest) + index.to_bytes(INDEX_BYTES, "big")


def digest_of_key(key: bytes) -> Digest:
    """Inverse of :func:`entry_key`; raises ``InvalidReference`` for a key that is not one."""
    algorithm, _, raw = key.partition(b":")
    return Digest(algorithm.decode(errors="replace"), raw.hex())


def checksum(chunk: bytes | memoryview, fmt: int = _FORMAT) -> bytes:
    """A chunk's checksum as a meta of format ``fmt`` records it (see the module doc)."""
    if fmt == 1:
        return blake3.blake3(chunk).digest()
    return xxhash.xxh3_128_digest(chunk)


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """The decoded meta of one cached pack."""

    size: int
    chunk_bytes: int
    inserted_ns: int
    pins: int
    checksums: bytes  # CHECKSUM_BYTES_BY_FORMAT[fmt] per chunk
    #: A reference entry's file (absolute path); "" when the chunks are in the environment.
    file: str = ""
    #: The meta's format, which names the checksum algorithm (see the module doc).
    fmt: int = _FORMAT
    #: The catalog checked the pack's values finite when it filled the entry (format 3).
    values_finite: bool = False

    @property
    def chunk_count(self) -> int:
        return len(self.checksums) // CHECKSUM_BYTES_BY_FORMAT[self.fmt]

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def checksum(self, index: int) -> bytes:
        width = CHECKSUM_BYTES_BY_FORMAT[self.fmt]
        return self.checksums[index * width : (index + 1) * width]

    def matches(self, index: int, chunk: bytes | memoryview) -> bool:
        """Whether ``chunk`` holds the bytes chunk ``index`` was recorded with."""
        return checksum(chunk, self.fmt) == self.checksum(index)

    def same_bytes(self, other: EntryMeta) -> bool:
        """Whether ``other`` describes the same chunks (a refill may differ in pins and time)."""
        return (self.size, self.chunk_bytes, self.checksums, self.file) == (
            other.size,
            other.chunk_bytes,
            other.checksums,
            other.file,
        )

    def encode(self) -> bytes:
        if self.values_finite and self.fmt < 3:
            raise ValueError(f"meta format {self.fmt} has no flags")
        flags = (
            _FLAGS.pack(FLAG_VALUES_FINITE if self.values_finite else 0) if self.fmt >= 3 else b""
        )
        header = _META.pack(
            self.fmt,
            CODEC_FILE if self.file else CODEC_RAW,
            self.size,
            self.chunk_bytes,
            self.chunk_count,
            self.inserted_ns,
            self.pins,
        )
        return header + flags + self.checksums + self.file.encode()

    def with_pins(self, pins: int) -> EntryMeta:
        return EntryMeta(
            self.size,
            self.chunk_bytes,
            self.inserted_ns,
            pins,
            self.checksums,
            self.file,
            self.fmt,
            self.values_finite,
        )

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> EntryMeta:
        """Raises ``ValueError`` naming what is wrong with ``raw``."""
        if len(raw) < _META.size:
            raise ValueError(f"meta is {len(raw)} bytes, shorter than its header")
        fmt, codec, size, chunk_bytes, count, inserted_ns, pins = _META.unpack_from(raw)
        if fmt not in CHECKSUM_BYTES_BY_FORMAT or codec not in (CODEC_RAW, CODEC_FILE):
            raise ValueError(f"meta has format {fmt} codec {codec}; this version reads 1-3/0-1")
        if size <= 0 or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"meta has size {size}, chunk_bytes {chunk_bytes}")
        if count != -(-size // chunk_bytes):
            raise ValueError(f"meta has {count} chunks for {size} bytes of {chunk_bytes}")
        start = _META.size
        flags = 0
        if fmt >= 3:
            if len(raw) < start + _FLAGS.size:
                raise ValueError(f"meta is {len(raw)} bytes, shorter than its header")
            (flags,) = _FLAGS.unpack_from(raw, start)
            if flags & ~FLAG_VALUES_FINITE:
                raise ValueError(f"meta has unknown flags {flags:#x}")
            start += _FLAGS.size
        end = start + count * CHECKSUM_BYTES_BY_FORMAT[fmt]
        if codec == CODEC_RAW and len(raw) != end:
            raise ValueError(f"meta is {len(raw)} bytes, expected {count} checksums")
        if codec == CODEC_FILE and len(raw) <= end:
            raise ValueError(f"reference meta is {len(raw)} bytes, without a file path")
        file = ""
        if codec == CODEC_FILE:
            try:
                file = bytes(raw[end:]).decode()
            except UnicodeDecodeError:
                raise ValueError("reference meta names a file path that is not UTF-8") from None
            if not file.startswith("/"):
                raise ValueError(f"reference meta names a relative file path {file!r}")
        values_finite = bool(flags & FLAG_VALUES_FINITE)
        checksums = bytes(raw[start:end])
        return cls(size, chunk_bytes, inserted_ns, pins, checksums, file, fmt, values_finite)

    @classmethod
    def for_data(
        cls,
        data: bytes,
        chunk_bytes: int,
        *,
        file: str = "",
        values_finite: bool = False,
        checksums: bytes | None = None,
    ) -> EntryMeta:
        """The meta of ``data`` cut into chunks; with ``file``, a reference entry to that file
        (which holds exactly ``data``); ``values_finite``: the pack's values were checked
        finite (``FLAG_VALUES_FINITE``); ``checksums``: :func:`chunk_checksums` of ``data``
        at ``chunk_bytes``, when the caller took them already from the same bytes."""
        if checksums is None:
            checksums = chunk_checksums(data, chunk_bytes)
        return cls(
            len(data), chunk_bytes, time.time_ns(), 0, checksums, file, values_finite=values_finite
        )


def chunk_checksums(data: bytes | memoryview, chunk_bytes: int) -> bytes:
    """The :func:`checksum` of each ``chunk_bytes`` chunk of ``data``, concatenated (as an
    entry's meta holds them)."""
    view = memoryview(data)
    return b"".join(checksum(view[i : i + chunk_bytes]) for i in range(0, len(view), chunk_bytes))


def host_id() -> str:
    """This machine and boot, as its kernel names them: equal in every process of one boot of
    one host (containers included), different on another host or after a reboot."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
