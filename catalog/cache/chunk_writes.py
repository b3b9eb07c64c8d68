"""Writes of cached packs inside one LMDB write transaction: install, pins, delete.

The write-side counterpart of :mod:`catalog.cache.chunk_reads`, used by the one writer,
:class:`~catalog.cache.pack_cache.PackCache` (which serialises its write transactions;
:class:`~catalog.cache.environment.CacheEnvironment` grows the map around them). Each function
is one step of a transaction the caller commits, so a fill, with the deletion of its victims,
is all or nothing (see the pack cache's crash safety).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.cache.chunk_reads import Tables
from catalog.cache.layout import INDEX_BYTES, MAX_INDEX, EntryMeta, entry_key
from catalog.digest import Digest
from catalog.errors import Internal, ResourceExhausted

if TYPE_CHECKING:
    Txn = Any  # lmdb.Transaction, opened for writing

#: The LMDB map (address space, not disk) is a multiple of this, and at least the minimum.
MAP_ALIGN = 1 << 20
_MIN_MAP_SIZE = 64 << 20


def initial_map_size(capacity_bytes: int, chunk_bytes: int) -> int:
    """The LMDB map a cache of ``capacity_bytes`` in chunks of ``chunk_bytes`` starts with."""
    # Each chunk is an overflow run that wastes up to a page, freed pages are reused only after
    # the readers that could see them finish, and metas and branch pages need a little more.
    chunk_overhead = capacity_bytes // max(1, chunk_bytes // 4096)
    wanted = capacity_bytes + capacity_bytes // 4 + chunk_overhead + _MIN_MAP_SIZE
    return -(-wanted // MAP_ALIGN) * MAP_ALIGN


def install_entry(
    txn: Txn, tables: Tables, digest: Digest, data: bytes, meta: EntryMeta, victims: list[str]
) -> None:
    """Delete ``victims`` (digests as text) and any leftover of ``digest``, then write its
    chunks (none for a reference entry) and its meta.

    Raises ``ResourceExhausted`` for a pack of more chunks than the key layout can index.
    """
    for victim in victims:
        delete_entry(txn, tables, entry_key(Digest.parse(victim)))
    ekey = entry_key(digest)
    delete_entry(txn, tables, ekey)  # leftovers of an untracked copy
    view = memoryview(data)
    size = meta.chunk_bytes
    if meta.chunk_count - 1 > MAX_INDEX:
        raise ResourceExhausted(f"{digest} has more than {MAX_INDEX} chunks")
    for index in range(0 if meta.file else meta.chunk_count):  # a reference: no chunks
        txn.put(
            ekey + index.to_bytes(INDEX_BYTES, "big"),
            view[index * size : (index + 1) * size],
            db=tables.chunks,
        )
    # The meta goes last: within the one transaction this is only tidiness, but it keeps the
    # invariant "a meta implies all its chunks" true of every prefix of the writes.
    txn.put(ekey, meta.encode(), db=tables.entries)


def set_entry_pins(txn: Txn, tables: Tables, digest: Digest, pins: int, where: Path) -> None:
    """Record ``pins`` in ``digest``'s meta. Raises ``Internal`` when it has no meta on disk
    (the cache at ``where`` tracks it: its state and the environment disagree)."""
    ekey = entry_key(digest)
    raw = txn.get(ekey, db=tables.entries)
    if raw is None:
        raise Internal(f"pack cache {where}: {digest} is tracked but has no meta on disk")
    txn.put(ekey, EntryMeta.decode(raw).with_pins(pins).encode(), db=tables.entries)


def delete_entry(txn: Txn, tables: Tables, ekey: bytes) -> None:
    """Delete the entry under ``ekey``: its meta and every chunk keyed under it."""
    txn.delete(ekey, db=tables.entries)
    cursor = txn.cursor(db=tables.chunks)
    if not cursor.set_range(ekey):
        return
    width = len(ekey) + INDEX_BYTES
    while True:
        found = cursor.key()
        if len(found) != width or not found.startswith(ekey):
            return
        cursor.delete()
