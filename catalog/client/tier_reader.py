"""Whole packs read from the catalog's NVMe tier in an engine's process, every chunk checked.

Owns the read itself, on a handle from ``catalog.client.tier_environment``; whether a read
needs a lease, and what happens when it fails, is ``catalog.client.colocated``'s.

What a read does, in one LMDB read transaction: the entry's meta, then per chunk a zero-copy
view into the map, copied once into the one buffer that is returned, and the copy checked
against the chunk's checksum (recorded by the catalog from bytes it had verified against
the revision's digest, as on the catalog's own reads; see ``catalog.cache.pack_cache``). So the
bytes returned are exactly the checked ones, and the transaction's snapshot keeps every page it
reads from reuse until it ends, whatever the catalog writes meanwhile. The returned buffer is
private and read-only; nothing references the map after the read (an engine may keep views
into the buffer for as long as it likes, and the lease ends at once). A reference entry (a
``file://`` store on the tier's filesystem, see ``catalog.cache.layout``) is read with no copy
at all: the store's immutable file is mapped read-only, every chunk checked on the map, and the
map returned (it outlives the file's unlinking by GC); the map is kept for the next read of the
same file (``catalog.client.mapped_files``), which checks every chunk again.
"""

from __future__ import annotations

import lmdb

from catalog.cache.chunk_reads import CorruptEntry, chunk_view, read_meta
from catalog.cache.layout import EntryMeta, checksum, entry_key
from catalog.client.mapped_files import MappedFiles
from catalog.client.tier_environment import CacheLocation, SharedEnvironment, open_environment
from catalog.digest import Digest
from catalog.hostmem import new_buffer

__all__ = ["ColocatedReader", "CorruptChunk", "EntryMissing", "open_reader"]


class EntryMissing(Exception):
    """The leased entry is not in the environment (the lease expired before the read)."""


class CorruptChunk(Exception):
    """A chunk failed its checksum; ``offset`` is its first byte in the pack."""

    def __init__(self, why: str, offset: int) -> None:
        super().__init__(why)
        self.offset = offset


def open_reader(location: CacheLocation) -> ColocatedReader:
    """A reader of the NVMe tier at ``location``, if this process can read it.

    Raises:
        NotColocated: another host, the catalog's own process, or an environment that cannot
            be opened read-only here or is not the one the catalog named.
    """
    return ColocatedReader(open_environment(location))


class ColocatedReader:
    """Reads whole packs from a catalog's NVMe tier in this process (see the module doc).

    Thread safe. ``close`` when done (the environment closes with its last reader).
    """

    def __init__(self, shared: SharedEnvironment) -> None:
        self._shared = shared
        self._closed = False
        self.path = shared.path
        #: Store files of reference entries, kept mapped between reads (``mapped_files``).
        self.mapped = MappedFiles()

    def read(self, digest: Digest, size: int, name: str) -> memoryview:
        """The pack ``digest`` (``size`` bytes) as a private read-only buffer, every chunk
        checked against its checksum. The caller holds a lease on it.

        Raises:
            EntryMissing: no such entry (or one of another size).
            CorruptChunk: a chunk is missing, short or fails its checksum.
        """
        return self.read_entry(digest, size, name)[0]

    def read_entry(self, digest: Digest, size: int, name: str) -> tuple[memoryview, bool]:
        """As :meth:`read`, with whether the entry's meta records the pack's values checked
        finite by the catalog (``layout.FLAG_VALUES_FINITE``): then the bytes returned, which
        matched the meta's checksums, are the ones it checked.

        Raises:
            As :meth:`read`.
        """
        for attempt in range(2):
            try:
                with self._shared.gate.shared():
                    return self._read(digest, size, name)
            except lmdb.MapResizedError:
                if attempt:
                    raise
                self._shared.adopt_grown_map()  # the catalog grew its map since we opened
        raise AssertionError("unreachable")

    def _read(self, digest: Digest, size: int, name: str) -> tuple[memoryview, bool]:
        shared = self._shared
        ekey = entry_key(digest)
        with shared.begin() as txn:
            try:
                meta = read_meta(txn, shared.tables, ekey, name)
            except CorruptEntry as exc:
                raise CorruptChunk(f"{exc} (in {self.path})", 0) from None
            if meta is None:
                raise EntryMissing(f"{name} is not in the NVMe tier at {self.path}")
            if meta.size != size:
                raise EntryMissing(f"{name} is {meta.size} bytes in {self.path}, not {size}")
            if meta.file:
                return _map_referenced_file(self.mapped, meta, name), meta.values_finite
            buffer = new_buffer(size)
            out = memoryview(buffer)
            for index in range(meta.chunk_count):
                start = index * meta.chunk_bytes
                try:
                    view = chunk_view(txn, shared.tables, ekey, meta, index, name, b"")
                except CorruptEntry as exc:
                    raise CorruptChunk(str(exc), start) from None
                piece = out[start : start + len(view)]
                piece[:] = view
                # The copy is what is checked, so what is returned is exactly what matched.
                if checksum(piece, meta.fmt) != meta.checksum(index):
                    raise CorruptChunk(f"chunk {index} of {name} fails its checksum", start)
        return out.toreadonly(), meta.values_finite

    def close(self) -> None:
        """Stop using the environment. Idempotent."""
        if not self._closed:
            self._closed = True
            self.mapped.clear()
            self._shared.release()


def _map_referenced_file(mapped: MappedFiles, meta: EntryMeta, name: str) -> memoryview:
    """A reference entry's bytes: the durable tier's file mapped read-only (a map kept from an
    earlier read while the path names the same file, see ``mapped_files``), every chunk checked
    on the map, on every read; no copy at all. The file is immutable (written once under a
    temporary name and renamed into place) and a mapping outlives its unlinking (GC), so the
    view never changes. A map that fails a check is dropped, so the read after the catalog's
    repair maps the file afresh. (The checks on one thread: shared with a helper thread they
    made the attach ~0.5 ms slower on the busy 2-core machine, see docs/PERFORMANCE.md.)"""
    try:
        view = mapped.view(meta.file)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise CorruptChunk(f"the file of {name} ({meta.file}): {exc}", 0) from None
    if len(view) != meta.size:
        mapped.drop(meta.file)
        raise CorruptChunk(f"the file of {name} ({meta.file}) is {len(view)} bytes", 0)
    for index in range(meta.chunk_count):
        start = index * meta.chunk_bytes
        if checksum(view[start : start + meta.chunk_bytes], meta.fmt) != meta.checksum(index):
            mapped.drop(meta.file)
            raise CorruptChunk(f"chunk {index} of {name} fails its checksum", start)
    return view
