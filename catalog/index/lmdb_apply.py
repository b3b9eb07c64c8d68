"""Applying events to the LMDB index inside a write batch: push, alias, delete, metadata and
purge.

Every handler validates before its first write, so a refused event leaves nothing behind and
its transaction can be committed rather than aborted (see
:mod:`catalog.index.environment`). What every event of a batch would rewrite (the adapter
record, blob refcounts, purge tombstones) is gathered in the
:class:`~catalog.index.lmdb_batch.WriteBatch` and written once by
:func:`~catalog.index.lmdb_batch.flush`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from catalog import keys
from catalog.errors import CatalogError
from catalog.events import Event
from catalog.index import records, rules
from catalog.index.lmdb_batch import Interner, WriteBatch
from catalog.index.lmdb_layout import SEQ, Databases, number_at, scan
from catalog.index.lmdb_reads import IndexReads
from catalog.index.records import AdapterRecord

if TYPE_CHECKING:
    from catalog.index.environment import Txn

__all__ = ["EventApplier"]

_Handler = Callable[[WriteBatch, bytes, AdapterRecord, Event], None]


class EventApplier:
    """Applies events to a batch; the rules are :mod:`catalog.index.rules`'s."""

    def __init__(self, dbs: Databases, interner: Interner, reads: IndexReads) -> None:
        self._dbs = dbs
        self._interner = interner
        self._reads = reads
        self._handlers: dict[str, _Handler] = {
            "push": self._apply_push,
            "alias": self._apply_alias,
            "delete": self._apply_delete,
            "metadata": self._apply_metadata,
        }

    def apply_batch(
        self, batch: WriteBatch, events: list[Event]
    ) -> tuple[int, CatalogError | None]:
        """Apply ``events`` in order: how many were applied, and the error that refused the
        next one. Raises that error instead when it refused the first (nothing applied)."""
        for position, event in enumerate(events):
            try:
                rules.check_event_shape(event)
                self.apply_one(batch, event)
            except CatalogError as error:
                if position == 0:
                    raise
                # validation happens before any write, so the batch so far is consistent
                return position, error
        return len(events), None

    def apply_one(self, batch: WriteBatch, event: Event) -> None:
        """Apply one well-shaped event and clear its intent. Raises the ``CatalogError`` that
        refuses it, before any write."""
        adapter = event.adapter
        if adapter == batch.last_adapter:  # a replayed log comes adapter by adapter
            adapter_key = batch.last_adapter_key
        else:
            adapter_key = keys.encode(adapter.tenant, adapter.name)
            batch.last_adapter, batch.last_adapter_key = adapter, adapter_key
        record = batch.adapters.get(adapter_key)
        after_purge = False
        if record is None:
            stored = batch.txn.get(adapter_key, db=self._dbs.adapters)
            if stored:
                record = AdapterRecord.decode(stored)
            else:
                record = AdapterRecord.new(event.at)
                record.next_seq = self._tombstone_seq(batch, adapter_key)
                after_purge = record.next_seq > 1
        if event.seq != record.next_seq:
            raise rules.stale_seq(event, record.next_seq)
        if event.op == "purge":
            self._apply_purge(batch, adapter_key, record, event)
            batch.adapters.pop(adapter_key, None)
            batch.revived.discard(adapter_key)
            batch.purged[adapter_key] = event.seq + 1
        else:
            self._handlers[event.op](batch, adapter_key, record, event)
            record.next_seq += 1
            record.updated_at = event.at
            batch.adapters[adapter_key] = record
            if after_purge:
                batch.revived.add(adapter_key)
        if batch.has_intents:
            batch.txn.delete(adapter_key + keys.encode(event.seq), db=self._dbs.intents)

    def _tombstone_seq(self, batch: WriteBatch, adapter_key: bytes) -> int:
        """The next seq of a name without an adapter record: past its purge, or 1."""
        if adapter_key in batch.purged:
            return batch.purged[adapter_key]
        found = batch.txn.get(adapter_key, db=self._dbs.purged)
        return int(SEQ.unpack(found)[0]) if found else 1

    def _apply_purge(
        self, batch: WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        """Remove every row of the adapter; refused while it has live revisions or no events
        (the first event of a name is always a push, so ``next_revision`` 1 means none)."""
        txn, dbs = batch.txn, self._dbs
        if record.next_revision == 1:
            raise rules.purge_unknown(event)
        if record.live:
            live = [
                number_at(key, len(adapter_key))
                for key, _ in scan(txn, dbs.revisions, adapter_key, None, 10)
            ]
            raise rules.purge_live(event, live)
        # Aliases, their reverse rows and digests cannot outlive the last live revision (the
        # apply rules see to that); they are swept too so a purge leaves no row whatever came.
        for db in (dbs.aliases, dbs.revision_aliases, dbs.history, dbs.digests):
            cursor = txn.cursor(db=db)
            positioned = cursor.set_range(adapter_key)
            while positioned and cursor.key().startswith(adapter_key):
                positioned = cursor.delete()
        txn.delete(adapter_key, db=dbs.adapters)

    def _apply_push(
        self, batch: WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        if event.revision != record.next_revision:
            raise rules.wrong_push_number(event, record.next_revision)
        summary = rules.PackSummary.from_manifest(event.manifest)
        digest = event.digest
        assert digest is not None
        raw = bytes.fromhex(digest.hex)
        txn, intern = batch.txn, self._interner.intern
        value = records.encode_revision(
            algorithm_id=intern(batch, digest.algorithm),
            digest_raw=raw,
            size_bytes=event.size_bytes,
            created_at=event.at,
            summary=summary,
            base_id_id=intern(batch, summary.base_id),
            dtype_id=intern(batch, summary.dtype),
            modules_id=intern(batch, summary.target_modules),
            metadata=event.metadata,
        )
        number = keys.encode(event.revision)
        txn.put(adapter_key + number, value, db=self._dbs.revisions)
        ref_key = keys.encode(digest.algorithm, raw)
        digest_key = adapter_key + ref_key
        holders = txn.get(digest_key, db=self._dbs.digests) or b""
        txn.put(digest_key, holders + records.encode_number(event.revision), db=self._dbs.digests)
        batch.ref_deltas[ref_key] = batch.ref_deltas.get(ref_key, 0) + 1
        record.next_revision = event.revision + 1
        record.latest = event.revision
        record.live += 1

    def _apply_alias(
        self, batch: WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        txn, dbs = batch.txn, self._dbs
        alias_key = adapter_key + keys.encode(event.alias)
        found = txn.get(alias_key, db=dbs.aliases)
        current = records.decode_number(found) if found else 0
        if event.previous != current:
            raise rules.stale_alias(event, current)
        if event.revision == 0:
            if current == 0:
                raise rules.unset_alias(event)
        elif txn.get(adapter_key + keys.encode(event.revision), db=dbs.revisions) is None:
            raise rules.not_live(event, record.next_revision)
        if current:
            txn.delete(adapter_key + keys.encode(current, event.alias), db=dbs.revision_aliases)
        if event.revision:
            txn.put(alias_key, records.encode_number(event.revision), db=dbs.aliases)
            txn.put(
                adapter_key + keys.encode(event.revision, event.alias),
                b"",
                db=dbs.revision_aliases,
            )
        else:
            txn.delete(alias_key, db=dbs.aliases)
        txn.put(
            adapter_key + keys.encode(event.alias, event.seq),
            records.encode_move(current, event.revision, event.at, event.principal),
            db=dbs.history,
        )

    def _apply_delete(
        self, batch: WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        txn, dbs = batch.txn, self._dbs
        revision_key = adapter_key + keys.encode(event.revision)
        value = txn.get(revision_key, db=dbs.revisions)
        if value is None:
            raise rules.not_live(event, record.next_revision)
        holding = self._reads.aliases_at(txn, adapter_key, event.revision)
        if holding:
            raise rules.aliased_delete(event, holding)
        algorithm, raw = records.revision_digest(value, self._interner.lookup(txn))
        txn.delete(revision_key, db=dbs.revisions)
        digest_key = adapter_key + keys.encode(algorithm, raw)
        holders = records.decode_numbers(txn.get(digest_key, db=dbs.digests) or b"")
        remaining = [n for n in holders if n != event.revision]
        if remaining:
            txn.put(digest_key, records.encode_numbers(remaining), db=dbs.digests)
        else:
            txn.delete(digest_key, db=dbs.digests)
        ref_key = keys.encode(algorithm, raw)
        batch.ref_deltas[ref_key] = batch.ref_deltas.get(ref_key, 0) - 1
        record.live -= 1
        if record.latest == event.revision:
            record.latest = _highest_live_below(txn, dbs, adapter_key, event.revision)

    def _apply_metadata(
        self, batch: WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        revision_key = adapter_key + keys.encode(event.revision)
        value = batch.txn.get(revision_key, db=self._dbs.revisions)
        if value is None:
            raise rules.not_live(event, record.next_revision)
        merged = records.merge_metadata(value, event.metadata, event.removed)
        batch.txn.put(revision_key, merged, db=self._dbs.revisions)


def _highest_live_below(txn: Txn, dbs: Databases, adapter_key: bytes, number: int) -> int:
    cursor = txn.cursor(db=dbs.revisions)
    found = cursor.set_range(adapter_key + keys.encode(number))
    moved = cursor.prev() if found else cursor.last()
    if moved and cursor.key().startswith(adapter_key):
        return number_at(cursor.key(), len(adapter_key))
    return 0
