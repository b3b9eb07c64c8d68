"""The pack cache's reads: a whole pack, a byte range, and a range streamed in pieces.

Each read tries the cached copy first and falls back to the miss path
(:mod:`catalog.cache.fills`) when it is absent, or was dropped as corrupt on the way
(:mod:`catalog.cache.repair`). A whole-pack hit is hashed against its digest; a ranged or
streamed hit checks only the chunks it touches against their fill-time checksums
(:mod:`catalog.cache.chunk_reads`, inside short read transactions). Hits are counted here, and
recorded with the eviction policy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

from catalog.cache import chunk_reads
from catalog.cache.cache_state import Loader, PackCacheState
from catalog.cache.chunk_reads import CorruptEntry, check_offset
from catalog.cache.layout import DEFAULT_CHUNK_BYTES, EntryMeta, entry_key
from catalog.digest import Digest
from catalog.errors import Internal, InvalidArgument

__all__ = ["ReadMixin"]


class ReadMixin(PackCacheState):
    """The read methods, mixed into :class:`~catalog.cache.pack_cache.PackCache`."""

    def read_through(self, digest: Digest, loader: Loader, *, name_for_errors: str) -> bytes:
        """The verified bytes of ``digest``'s pack, from the cache or else from ``loader``.

        On a miss, ``loader()`` is called once however many threads ask for the same digest at
        the same time (the others wait for its bytes or its exception), and what it returns is
        cached if the policy admits it. ``loader`` must return bytes already verified against
        ``digest``: they are checksummed per chunk, not hashed again. A cached copy that fails
        verification is dropped and the read continues as a miss. ``name_for_errors`` (e.g.
        ``acme/x@3``) names the pack in logs and errors.

        Raises:
            Whatever ``loader`` raises (e.g. ``DataLoss`` for a corrupt durable copy).
            Internal: ``loader`` returned something that is not bytes.
            FailedPrecondition: the cache is closed.
        """
        self._check_open()
        return self._hit_or_load(digest, self._read_whole, loader, name_for_errors, _whole)

    def read_range(
        self, digest: Digest, offset: int, length: int, loader: Loader, *, name_for_errors: str
    ) -> bytes:
        """``length`` bytes of ``digest``'s pack from ``offset`` (fewer at its end).

        A hit reads and checks only the chunks the range touches (against their fill-time
        checksums); a miss loads and caches the whole pack as :meth:`read_through` does.

        Raises:
            InvalidArgument: negative ``offset`` or ``length``, or ``offset`` past the end.
            As :meth:`read_through` otherwise.
        """
        self._check_open()
        _check_range(offset, length, name_for_errors)

        def read_span(target: Digest, name: str) -> bytes | None:
            return self._read_span(target, offset, length, name)

        def span_of(loaded: bytes, name: str) -> bytes:
            check_offset(offset, len(loaded), name)
            return loaded[offset : offset + length]

        return self._hit_or_load(digest, read_span, loader, name_for_errors, span_of)

    def iter_range(
        self,
        digest: Digest,
        offset: int,
        length: int,
        loader: Loader,
        *,
        name_for_errors: str,
        piece_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> Iterator[bytes]:
        """:meth:`read_range` in pieces of at most ``piece_bytes``, in order, for sending a
        range out without assembling it in memory first (the catalog's ``FetchPack``).

        A hit reads each touched chunk in a read transaction of its own, checks it against its
        checksum and yields copies of its slices, so nothing stays open while the caller sends
        a piece. A copy that fails a check midway is dropped as on any read, and the rest of
        the range (like all of it on a miss) comes from ``loader`` (once per digest at a time,
        cached if admitted, as :meth:`read_through` does); so does the rest of a copy evicted
        midway. The pieces follow the chunk boundaries (a piece never spans two chunks), so
        the first and last may be short. A hit counts once, with the bytes it served.

        Raises (when called):
            InvalidArgument: negative ``offset`` or ``length``, ``piece_bytes`` < 1.
            FailedPrecondition: the cache is closed.
        Raises (while iterating): InvalidArgument for ``offset`` past the end; as
            :meth:`read_through` otherwise.
        """
        self._check_open()
        _check_range(offset, length, name_for_errors)
        if type(piece_bytes) is not int or piece_bytes < 1:
            raise InvalidArgument(f"piece_bytes must be a positive integer, got {piece_bytes!r}")
        return self._iter_range(digest, offset, length, loader, name_for_errors, piece_bytes)

    def _hit_or_load(
        self,
        digest: Digest,
        read: Callable[[Digest, str], bytes | None],
        loader: Loader,
        name: str,
        serve_loaded: Callable[[bytes, str], bytes],
    ) -> bytes:
        """``read``'s bytes, counted as a hit; on a miss, ``serve_loaded`` of the loaded pack.

        Looks twice: a fill that lands between the first look and the load is read, not
        loaded again.
        """
        for attempt in range(2):
            data = self._cached(digest, read, name)
            if data is not None:
                self._count_hit(str(digest), len(data))
                return data
            loaded = self._load(digest, loader, name, recheck=attempt == 0)
            if loaded is not None:
                return serve_loaded(loaded, name)
        raise Internal(f"pack cache: {name} ({digest}) vanished twice while reading")

    def _read_whole(self, digest: Digest, name: str) -> bytes | None:
        """The cached pack verified against its digest; ``None`` when not cached.

        Raises ``CorruptEntry`` when it is cached but fails verification.
        """
        ekey = entry_key(digest)
        found = self._env.read(
            lambda txn: chunk_reads.read_whole(txn, self._env.tables, ekey, name)
        )
        if found is None:
            return None
        data, seen = found
        actual = Digest.of(data, digest.algorithm)  # after the transaction ended
        if actual != digest:
            raise CorruptEntry(f"cached bytes of {name} hash to {actual}, not {digest}", seen)
        return data

    def _read_span(self, digest: Digest, offset: int, length: int, name: str) -> bytes | None:
        ekey = entry_key(digest)
        return self._env.read(
            lambda txn: chunk_reads.read_span(txn, self._env.tables, ekey, offset, length, name)
        )

    def _iter_range(
        self,
        digest: Digest,
        offset: int,
        length: int,
        loader: Loader,
        name: str,
        piece_bytes: int,
    ) -> Iterator[bytes]:
        key = str(digest)
        cached = None
        for attempt in range(2):
            cached = self._cached(digest, self._read_meta, name)
            if cached is not None:
                break
            loaded = self._load(digest, loader, name, recheck=attempt == 0)
            if loaded is not None:
                yield from chunk_reads.pieces(loaded, offset, offset + length, piece_bytes, name)
                return
        if cached is None:
            raise Internal(f"pack cache: {name} ({digest}) vanished twice while reading")
        check_offset(offset, cached.size, name)
        position, end = offset, min(cached.size, offset + length)
        served = 0
        try:
            while position < end:
                read = functools.partial(
                    self._read_chunk_pieces,
                    cached=cached,
                    position=position,
                    end=end,
                    piece_bytes=piece_bytes,
                )
                pieces = self._cached(digest, read, name)
                if pieces is None:  # evicted, replaced or dropped as corrupt since
                    break
                for piece in pieces:
                    served += len(piece)
                    position += len(piece)
                    yield piece
        finally:
            if served or offset == end:  # not when the first chunk was already gone
                self._count_hit(key, served)
        if position < end:
            loaded = self._load(digest, loader, name, recheck=False)
            if loaded is None:  # unreachable without recheck; keeps the type checker honest
                raise Internal(f"pack cache: {name} ({digest}) vanished while reading")
            yield from chunk_reads.pieces(loaded, position, end, piece_bytes, name)

    def _read_meta(self, digest: Digest, name: str) -> EntryMeta | None:
        ekey = entry_key(digest)
        return self._env.read(lambda txn: chunk_reads.read_meta(txn, self._env.tables, ekey, name))

    def _read_chunk_pieces(self, digest: Digest, name: str, **where: Any) -> list[bytes] | None:
        ekey = entry_key(digest)
        return self._env.read(
            lambda txn: chunk_reads.read_chunk_pieces(txn, self._env.tables, ekey, name, **where)
        )

    def _count_hit(self, key: str, size: int) -> None:
        with self._lock:
            self._counters.hits += 1
            self._counters.bytes_read += size
            # Not in the policy: evicted after the read's snapshot; the bytes were still good.
            if key in self._policy:
                self._policy.record_hit(key)


def _check_range(offset: int, length: int, name: str) -> None:
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise InvalidArgument(
            f"range of {name}: offset and length must be non-negative integers, "
            f"got {offset!r}, {length!r}"
        )


def _whole(loaded: bytes, name: str) -> bytes:
    return loaded
