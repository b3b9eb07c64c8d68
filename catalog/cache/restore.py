"""What opening a pack cache directory finds, and the policy rebuilt from it.

A fill writes a pack's chunks and meta in one transaction, so after any crash an entry is whole
or absent; still, a meta that does not decode, or chunks that no meta accounts for (left by a
future writer, a damaged file or a reference entry that replaced a copy), must never be served
or counted. :func:`scan` finds them; :func:`rebuild_policy` feeds the valid entries to the
eviction policy (pinned entries first, so they keep their room, then oldest first) and names
those that no longer fit a shrunken capacity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from catalog.cache.chunk_reads import Tables
from catalog.cache.layout import INDEX_BYTES, EntryMeta, digest_of_key, entry_key
from catalog.cache.policies import EvictionPolicy
from catalog.digest import Digest

log = logging.getLogger(__name__)


@dataclass
class Found:
    """An environment's contents: valid ``metas`` by entry key, ``doomed`` entry keys (to
    delete with their chunks) and ``orphans`` (single chunk keys to delete)."""

    metas: dict[bytes, EntryMeta] = field(default_factory=dict)
    doomed: list[bytes] = field(default_factory=list)
    orphans: list[bytes] = field(default_factory=list)


def scan(txn: Any, tables: Tables, where: str) -> Found:
    """Every entry and chunk key in ``txn``'s snapshot, sorted into :class:`Found`."""
    found = Found()
    for key, raw in txn.cursor(db=tables.entries):
        try:
            digest_of_key(key)
            found.metas[key] = EntryMeta.decode(raw)
        except (ValueError, LookupError) as exc:
            log.warning("pack cache %s: dropping entry %r: %s", where, key[:80], exc)
            found.doomed.append(key)
    dropped = set(found.doomed)
    for key in txn.cursor(db=tables.chunks).iternext(keys=True, values=False):
        owner = key[:-INDEX_BYTES]
        meta = found.metas.get(owner)
        if meta is None and owner in dropped:
            continue  # deleted with its entry
        index = int.from_bytes(key[-INDEX_BYTES:], "big")
        if meta is None or meta.file or index >= meta.chunk_count:
            found.orphans.append(key)
    return found


def rebuild_policy(policy: EvictionPolicy, found: Found, where: str) -> dict[str, int]:
    """Record ``found``'s entries in ``policy``; what does not fit (and what the policy evicts
    to make room) joins ``found.doomed``. Returns the pin counts by digest string."""
    pins: dict[str, int] = {}
    order = sorted(found.metas.items(), key=lambda item: (item[1].pins == 0, item[1].inserted_ns))
    for key, meta in order:
        name = str(digest_of_key(key))
        if meta.size > policy.capacity_bytes - policy.pinned_bytes:
            log.warning(
                "pack cache %s: %s (%d bytes, %d pins) does not fit the capacity %d beside "
                "%d pinned bytes; dropped",
                where, name, meta.size, meta.pins, policy.capacity_bytes, policy.pinned_bytes,
            )  # fmt: skip
            found.doomed.append(key)
            continue
        found.doomed.extend(entry_key(Digest.parse(v)) for v in policy.victims(meta.size))
        policy.record_insert(name, meta.size)
        for _ in range(meta.pins):
            policy.pin(name)
        if meta.pins:
            pins[name] = meta.pins
    return pins
