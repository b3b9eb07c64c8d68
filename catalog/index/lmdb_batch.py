"""One write transaction of the LMDB index, and the intern table it allocates ids from.

A batch applies many events in one transaction (a reindex applies 20,000 per transaction), so
what every event would rewrite is gathered and written once at the end (:func:`flush`): the
adapter records, blob refcount changes and purge tombstones. Strings that repeat across
revisions are interned (:class:`Interner`); ids a batch allocates are published to the
in-memory table only once it has committed, so a discarded batch leaves no id behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from catalog import keys
from catalog.errors import DataLoss
from catalog.index import records
from catalog.index.lmdb_layout import NEXT_INTERN_KEY, SEQ, Databases
from catalog.index.records import AdapterRecord, Interned, InternLookup
from catalog.model import AdapterName

if TYPE_CHECKING:
    from catalog.index.environment import Txn

__all__ = ["Interner", "WriteBatch", "flush"]


class WriteBatch:
    """One write transaction: the txn, the adapter records and blob refcount changes it will
    write back at the end, and the intern ids it allocated (published only after commit)."""

    def __init__(self, txn: Txn, intents_db: Any) -> None:
        self.txn = txn
        self.adapters: dict[bytes, AdapterRecord] = {}
        self.ref_deltas: dict[bytes, int] = {}
        self.new_interned: dict[Interned, int] = {}
        self.next_intern_id = 0  # 0 = not read from meta yet
        self.has_intents = txn.stat(intents_db)["entries"] > 0
        self.last_adapter: AdapterName | None = None
        self.last_adapter_key = b""
        #: names purged in this batch -> their next seq (tombstones written at flush)
        self.purged: dict[bytes, int] = {}
        #: names pushed again after a purge: their tombstones are deleted at flush
        self.revived: set[bytes] = set()


def flush(batch: WriteBatch, dbs: Databases) -> None:
    """Write what ``batch`` gathered. Raises ``DataLoss`` if a blob refcount would go below
    zero (the index disagrees with itself; the caller discards the transaction)."""
    txn = batch.txn
    for key, record in sorted(batch.adapters.items()):
        txn.put(key, record.encode(), db=dbs.adapters)
        if key in batch.revived:
            txn.delete(key, db=dbs.purged)
    for key, next_seq in sorted(batch.purged.items()):
        if key not in batch.adapters:
            txn.put(key, SEQ.pack(next_seq), db=dbs.purged)
    for key, delta in sorted(batch.ref_deltas.items()):
        if not delta:
            continue
        found = txn.get(key, db=dbs.blob_refs)
        count = (records.decode_number(found) if found else 0) + delta
        if count < 0:
            raise DataLoss(f"blob refcount of {keys.decode(key)} would go negative")
        if count:
            txn.put(key, records.encode_number(count), db=dbs.blob_refs)
        else:
            txn.delete(key, db=dbs.blob_refs)
    if batch.next_intern_id:
        txn.put(NEXT_INTERN_KEY, records.encode_number(batch.next_intern_id), db=dbs.meta)


class Interner:
    """Intern id <-> value: complete for this process's writes; a read of an id written by
    another process (or committed a moment before it was published) falls back to the db."""

    def __init__(self, dbs: Databases) -> None:
        self._dbs = dbs
        self._ids: dict[Interned, int] = {}
        self._values: dict[int, Interned] = {}

    def load(self, txn: Txn) -> None:
        """Read every interned value already in the environment."""
        for key, text in txn.cursor(db=self._dbs.interned):
            (intern_id,) = keys.decode(key)
            assert isinstance(intern_id, int)
            value = records.decode_interned(text)
            self._ids[value] = intern_id
            self._values[intern_id] = value

    def intern(self, batch: WriteBatch, value: Interned) -> int:
        """The id of ``value``, allocated (and written) in ``batch`` if it has none yet."""
        # keyed by the value itself (a str and a 1-tuple differ), so a hit costs one dict lookup
        found = self._ids.get(value)
        if found is None:
            found = batch.new_interned.get(value)
        if found is not None:
            return found
        if not batch.next_intern_id:
            stored = batch.txn.get(NEXT_INTERN_KEY, db=self._dbs.meta)
            batch.next_intern_id = records.decode_number(stored) if stored else 1
        intern_id = batch.next_intern_id
        batch.next_intern_id += 1
        text = records.encode_interned(value)
        batch.txn.put(keys.encode(intern_id), text.encode(), db=self._dbs.interned)
        batch.new_interned[value] = intern_id
        return intern_id

    def lookup(self, txn: Txn) -> InternLookup:
        """Id -> value within ``txn``; the lookup raises ``DataLoss`` for an id with no value."""

        def lookup(intern_id: int) -> Interned:
            value = self._values.get(intern_id)
            if value is None:
                # written by another process, or committed a moment before it was published
                text = txn.get(keys.encode(intern_id), db=self._dbs.interned)
                if text is None:
                    raise DataLoss(f"index references missing interned value {intern_id}")
                value = records.decode_interned(text)
            return value

        return lookup

    def publish(self, batch: WriteBatch) -> None:
        """Make the ids ``batch`` allocated known, once it has committed."""
        for value, intern_id in batch.new_interned.items():
            self._values[intern_id] = value
            self._ids[value] = intern_id
