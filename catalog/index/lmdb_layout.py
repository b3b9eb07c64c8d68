"""Where the LMDB index keeps what: its named sub-databases and the parts of their keys.

Layout (keys are ``catalog.keys`` tuples, ``t, n`` = tenant, name)::

    adapters          (t, n)                -> AdapterRecord (counters, latest, timestamps)
    revisions         (t, n, number)        -> revision record (digest, pack summary, metadata)
    aliases           (t, n, alias)         -> u32 revision
    revision_aliases  (t, n, number, alias) -> b""  (which aliases point at a revision)
    alias_history     (t, n, alias, seq)    -> (previous, revision, at) + principal
    digests           (t, n, algo, raw)     -> u32 revision numbers holding that digest
    blob_refs         (algo, raw)           -> u32 live revisions pointing at the blob (for GC)
    intents           (t, n, seq)           -> the event JSON, until applied or dropped
    purged            (t, n)                -> u64 next seq of a purged name (no adapter record)
    interned          (id,)                 -> JSON text of a repeated string or module list
    meta              (name,)               -> schema version, next intern id

The value layouts are :mod:`catalog.index.records`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from catalog import keys

__all__ = [
    "NEXT_INTERN_KEY",
    "SCHEMA_KEY",
    "SCHEMA_VERSION",
    "SEQ",
    "Databases",
    "number_at",
    "scan",
    "str_at",
]

SCHEMA_VERSION = 1
SCHEMA_KEY = keys.encode("schema")
NEXT_INTERN_KEY = keys.encode("next_intern_id")
#: A purge tombstone's value: the name's next seq.
SEQ = struct.Struct(">Q")
_NUMBER_TAG_WIDTH = 9  # a keys int part: tag + 8 bytes


@dataclass(frozen=True, slots=True)
class Databases:
    """The index's named sub-databases (handles valid while the environment is open)."""

    adapters: Any
    revisions: Any
    aliases: Any
    revision_aliases: Any
    history: Any
    digests: Any
    blob_refs: Any
    intents: Any
    interned: Any
    meta: Any
    #: Created on first open by a version with purge; an index from before has none.
    purged: Any

    #: How many there are (for ``max_dbs``).
    COUNT = 11

    @classmethod
    def open(cls, env: lmdb.Environment) -> Databases:
        """Open (creating where missing) every sub-database of ``env``."""
        return cls(
            adapters=env.open_db(b"adapters"),
            revisions=env.open_db(b"revisions"),
            aliases=env.open_db(b"aliases"),
            revision_aliases=env.open_db(b"revision_aliases"),
            history=env.open_db(b"alias_history"),
            digests=env.open_db(b"digests"),
            blob_refs=env.open_db(b"blob_refs"),
            intents=env.open_db(b"intents"),
            interned=env.open_db(b"interned"),
            meta=env.open_db(b"meta"),
            purged=env.open_db(b"purged"),
        )


def scan(
    txn: lmdb.Transaction[bytes], db: Any, prefix: bytes, after: bytes | None, limit: int
) -> Iterator[tuple[bytes, bytes]]:
    """Up to ``limit`` (key, value) pairs of ``db`` under ``prefix``, strictly after ``after``."""
    cursor = txn.cursor(db=db)
    positioned = cursor.set_range(after if after is not None else prefix)
    if positioned and after is not None and cursor.key() == after:
        positioned = cursor.next()
    while positioned and limit > 0:
        key = cursor.key()
        if not key.startswith(prefix):
            return
        yield key, cursor.value()
        limit -= 1
        positioned = cursor.next()


def number_at(key: bytes, offset: int) -> int:
    """The int part starting at ``offset`` of a key (skipping its tag byte)."""
    return int.from_bytes(key[offset + 1 : offset + _NUMBER_TAG_WIDTH], "big")


def str_at(key: bytes, offset: int) -> str:
    """The string part starting at ``offset`` of a key (skipping its tag byte)."""
    return key[offset + 1 : key.index(b"\x00", offset + 1)].decode()
