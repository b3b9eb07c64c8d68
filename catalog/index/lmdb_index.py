"""The catalog index on an LMDB environment: the one :class:`RevisionIndex` meant for production.

Layout (named sub-databases; keys are ``catalog.keys`` tuples, ``t, n`` = tenant, name)::

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

Every event is applied in one write transaction that validates first and writes second, so a
refused event leaves nothing behind. Reads run in read-only transactions and copy values out
before the transaction ends. The map starts at ``map_size`` and doubles (up to
``max_map_size``) whenever LMDB reports it full, with every transaction of this process held off
while it grows, as ``mdb_env_set_mapsize`` requires.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from catalog import keys
from catalog.digest import Digest, parse_digest_prefix
from catalog.errors import (
    CatalogError,
    DataLoss,
    FailedPrecondition,
    Internal,
    ResourceExhausted,
)
from catalog.events import Event
from catalog.index import paging, records, rules
from catalog.index.base import (
    DEFAULT_PAGE_SIZE,
    AdapterState,
    RevisionIndex,
)
from catalog.index.records import AdapterRecord, Interned
from catalog.model import (
    LATEST,
    AdapterName,
    AdapterSummary,
    AliasMove,
    Page,
    Ref,
    Revision,
    Selector,
)
from catalog.model import check_part as check_name_part

SCHEMA_VERSION = 1
DEFAULT_MAP_SIZE = 1 << 30  # sparse on Linux: address space, not disk, until pages are written
DEFAULT_MAX_MAP_SIZE = 1 << 40
DEFAULT_BATCH_EVENTS = 20_000  # events per write transaction in apply_many
_REFS_CHUNK = 1024
_NUMBER_TAG_WIDTH = 9  # a keys int part: tag + 8 bytes

_DB_NAMES = (
    "adapters",
    "revisions",
    "aliases",
    "revision_aliases",
    "alias_history",
    "digests",
    "blob_refs",
    "intents",
    "interned",
    "meta",
    "purged",
)
_SCHEMA_KEY = keys.encode("schema")
_NEXT_INTERN_KEY = keys.encode("next_intern_id")
_SEQ = struct.Struct(">Q")

T = TypeVar("T")


class _ResizeGate:
    """Any number of open transactions, or one map resize with none (LMDB's rule).

    Transactions register by appending to a list and leave by popping from it: both are single
    atomic operations, so the read path takes no lock. A lock there made writers queue behind
    busy readers for the GIL (a convoy: 3000 events took 40 s instead of 0.2 s). A resize raises
    a flag and waits for the list to drain; a transaction that registers and then sees the flag
    backs out and waits for the resize to finish.
    """

    __slots__ = ("_active", "_drained", "_idle", "_resize_lock", "_resizing", "closed")

    def __init__(self) -> None:
        self._active: list[None] = []
        self._resizing = False
        self._resize_lock = threading.Lock()
        self._idle = threading.Event()  # set while no resize is running
        self._idle.set()
        self._drained = threading.Event()  # set by the last transaction leaving during a resize
        self.closed = False

    def enter(self) -> None:
        while True:
            self._active.append(None)
            # checked after registering: a resize that raised the flag earlier is waited for,
            # one that raises it later sees this transaction and waits for it
            if not self._resizing:
                if self.closed:
                    self._active.pop()
                    raise FailedPrecondition("the index is closed")
                return
            self._active.pop()
            self._idle.wait()

    def leave(self) -> None:
        self._active.pop()
        if self._resizing and not self._active:
            self._drained.set()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._resize_lock:
            self._idle.clear()
            self._drained.clear()
            self._resizing = True
            try:
                while self._active:
                    # the timeout only covers a leave() that raced the clear() above
                    self._drained.wait(0.001)
                yield
            finally:
                self._resizing = False
                self._idle.set()


class _WriteBatch:
    """One write transaction: the txn, the adapter records and blob refcount changes it will
    write back at the end, and the intern ids it allocated (published only after commit)."""

    def __init__(self, txn: lmdb.Transaction[bytes], intents_db: Any) -> None:
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


class LmdbIndex(RevisionIndex):
    """The index in an LMDB environment directory ``path`` (created if missing).

    ``map_size`` is the initial map (it grows by doubling up to ``max_map_size``; beyond that
    writes raise ``ResourceExhausted``). ``sync=False`` skips the fsync per commit: the index is
    a cache of the durable log, so after a crash it can be caught up by replaying the log.
    Raises ``FailedPrecondition`` if the directory holds an index of another schema version
    (rebuild it with reindex).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        max_map_size: int = DEFAULT_MAX_MAP_SIZE,
        sync: bool = True,
        max_readers: int = 512,
        batch_events: int = DEFAULT_BATCH_EVENTS,
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._max_map_size = max(max_map_size, map_size)
        self._batch_events = max(1, batch_events)
        self._env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=len(_DB_NAMES) + 2,
            max_readers=max_readers,
            sync=sync,
            metasync=sync,
            meminit=False,
        )
        self._gate = _ResizeGate()
        self._write_lock = threading.Lock()
        self._adapters = self._env.open_db(b"adapters")
        self._revisions = self._env.open_db(b"revisions")
        self._aliases = self._env.open_db(b"aliases")
        self._revision_aliases = self._env.open_db(b"revision_aliases")
        self._history = self._env.open_db(b"alias_history")
        self._digests = self._env.open_db(b"digests")
        self._blob_refs = self._env.open_db(b"blob_refs")
        self._intents = self._env.open_db(b"intents")
        self._interned = self._env.open_db(b"interned")
        self._meta = self._env.open_db(b"meta")
        # created on first open by this version; an index from before purge simply has none
        self._purged = self._env.open_db(b"purged")
        self._handlers: dict[str, Callable[[_WriteBatch, bytes, AdapterRecord, Event], None]] = {
            "push": self._apply_push,
            "alias": self._apply_alias,
            "delete": self._apply_delete,
            "metadata": self._apply_metadata,
        }
        # id <-> interned value; complete for this process's writes, a read falls back to the db
        self._intern_ids: dict[Interned, int] = {}
        self._intern_values: dict[int, Interned] = {}
        try:
            self._open_schema()
        except BaseException:
            self._env.close()
            raise

    def _open_schema(self) -> None:
        with self._env.begin(write=True) as txn:
            found = txn.get(_SCHEMA_KEY, db=self._meta)
            if found is None:
                txn.put(_SCHEMA_KEY, str(SCHEMA_VERSION).encode(), db=self._meta)
            elif found != str(SCHEMA_VERSION).encode():
                raise FailedPrecondition(
                    f"index at {self.path} has schema {found.decode(errors='replace')!r}, this"
                    f" version reads {SCHEMA_VERSION}: rebuild it with reindex"
                )
            for key, text in txn.cursor(db=self._interned):
                (intern_id,) = keys.decode(key)
                assert isinstance(intern_id, int)
                value = records.decode_interned(text)
                self._intern_ids[value] = intern_id
                self._intern_values[intern_id] = value

    # -- transactions ---------------------------------------------------------------------------

    def _read(self, work: Callable[[lmdb.Transaction[bytes]], T]) -> T:
        while True:
            self._gate.enter()
            try:
                with self._env.begin(buffers=False) as txn:
                    return work(txn)
            except lmdb.MapResizedError:
                pass  # another process grew the map; adopt its size and retry
            finally:
                self._gate.leave()
            self._adopt_map_size()

    def _write(self, work: Callable[[_WriteBatch], T]) -> T:
        with self._write_lock:
            while True:
                self._gate.enter()
                try:
                    return self._write_once(work)
                except lmdb.MapFullError:
                    grow = True
                except lmdb.MapResizedError:
                    grow = False
                finally:
                    self._gate.leave()
                if grow:
                    self._grow_map()
                else:
                    self._adopt_map_size()

    def _write_once(self, work: Callable[[_WriteBatch], T]) -> T:
        """One write transaction, ended by commit wherever that is correct.

        ``Transaction.abort()`` of a write transaction in py-lmdb 3.0 stalls while other threads
        keep read transactions busy (seconds under steady reads, measured), so the expected
        endings avoid it: a refused event has written nothing (every handler checks before its
        first write), so its empty transaction is committed; a transaction that hit a full map
        is ended by a commit that LMDB refuses (``MDB_BAD_TXN``) and aborts internally. Only
        an unexpected failure, with writes possibly half done, pays for ``abort()``.
        """
        txn = self._env.begin(write=True, buffers=False)
        ended = False
        try:
            batch = _WriteBatch(txn, self._intents)
            try:
                result = work(batch)
            except CatalogError:
                ended = True
                txn.commit()
                raise
            self._flush(batch)
            ended = True
            txn.commit()
        except (lmdb.MapFullError, lmdb.MapResizedError):
            if not ended:
                _end_failed(txn)
            raise
        except BaseException:
            if not ended:
                txn.abort()
            raise
        self._publish_interned(batch)
        return result

    def _grow_map(self) -> None:
        with self._gate.exclusive():
            current = int(self._env.info()["map_size"])
            if current >= self._max_map_size:
                raise ResourceExhausted(
                    f"index at {self.path} is full at {current} bytes (max_map_size)"
                )
            self._env.set_mapsize(min(current * 2, self._max_map_size))

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            self._env.set_mapsize(0)

    def _flush(self, batch: _WriteBatch) -> None:
        txn = batch.txn
        for key, record in sorted(batch.adapters.items()):
            txn.put(key, record.encode(), db=self._adapters)
            if key in batch.revived:
                txn.delete(key, db=self._purged)
        for key, next_seq in sorted(batch.purged.items()):
            if key not in batch.adapters:
                txn.put(key, _SEQ.pack(next_seq), db=self._purged)
        for key, delta in sorted(batch.ref_deltas.items()):
            if not delta:
                continue
            found = txn.get(key, db=self._blob_refs)
            count = (records.decode_number(found) if found else 0) + delta
            if count < 0:
                raise DataLoss(f"blob refcount of {keys.decode(key)} would go negative")
            if count:
                txn.put(key, records.encode_number(count), db=self._blob_refs)
            else:
                txn.delete(key, db=self._blob_refs)
        if batch.next_intern_id:
            txn.put(_NEXT_INTERN_KEY, records.encode_number(batch.next_intern_id), db=self._meta)

    def _publish_interned(self, batch: _WriteBatch) -> None:
        for value, intern_id in batch.new_interned.items():
            self._intern_values[intern_id] = value
            self._intern_ids[value] = intern_id

    # -- interning ------------------------------------------------------------------------------

    def _intern(self, batch: _WriteBatch, value: Interned) -> int:
        # keyed by the value itself (a str and a 1-tuple differ), so a hit costs one dict lookup
        found = self._intern_ids.get(value)
        if found is None:
            found = batch.new_interned.get(value)
        if found is not None:
            return found
        if not batch.next_intern_id:
            stored = batch.txn.get(_NEXT_INTERN_KEY, db=self._meta)
            batch.next_intern_id = records.decode_number(stored) if stored else 1
        intern_id = batch.next_intern_id
        batch.next_intern_id += 1
        text = records.encode_interned(value)
        batch.txn.put(keys.encode(intern_id), text.encode(), db=self._interned)
        batch.new_interned[value] = intern_id
        return intern_id

    def _lookup_interned(self, txn: lmdb.Transaction[bytes]) -> Callable[[int], Interned]:
        def lookup(intern_id: int) -> Interned:
            value = self._intern_values.get(intern_id)
            if value is None:
                # written by another process, or committed a moment before it was published
                text = txn.get(keys.encode(intern_id), db=self._interned)
                if text is None:
                    raise DataLoss(f"index references missing interned value {intern_id}")
                value = records.decode_interned(text)
            return value

        return lookup

    # -- applying events ------------------------------------------------------------------------

    def generation(self) -> int:
        """The id of the last committed write transaction (any process's)."""
        return self._read(lambda txn: txn.id())

    def apply(self, event: Event) -> None:
        """Apply ``event`` in one write transaction and clear its intent; see the ABC for errors."""
        rules.check_event_shape(event)
        self._write(lambda batch: self._apply_one(batch, event))

    def apply_many(self, events: Iterable[Event]) -> int:
        """Apply events in order, ``batch_events`` per write transaction.

        On a refused event the events before it stay applied (committed) and the error is
        raised, exactly as applying them one by one would.
        """
        applied = 0
        stream = iter(events)
        while batch_events := list(islice(stream, self._batch_events)):
            done, error = self._write(lambda batch: self._apply_batch(batch, batch_events))
            applied += done
            if error is not None:
                raise error
        return applied

    def _apply_batch(
        self, batch: _WriteBatch, events: list[Event]
    ) -> tuple[int, CatalogError | None]:
        for position, event in enumerate(events):
            try:
                rules.check_event_shape(event)
                self._apply_one(batch, event)
            except CatalogError as error:
                if position == 0:
                    raise
                # validation happens before any write, so the batch so far is consistent
                return position, error
        return len(events), None

    def _apply_one(self, batch: _WriteBatch, event: Event) -> None:
        adapter = event.adapter
        if adapter == batch.last_adapter:  # a replayed log comes adapter by adapter
            adapter_key = batch.last_adapter_key
        else:
            adapter_key = keys.encode(adapter.tenant, adapter.name)
            batch.last_adapter, batch.last_adapter_key = adapter, adapter_key
        record = batch.adapters.get(adapter_key)
        after_purge = False
        if record is None:
            stored = batch.txn.get(adapter_key, db=self._adapters)
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
            batch.txn.delete(adapter_key + keys.encode(event.seq), db=self._intents)

    def _tombstone_seq(self, batch: _WriteBatch, adapter_key: bytes) -> int:
        """The next seq of a name without an adapter record: past its purge, or 1."""
        if adapter_key in batch.purged:
            return batch.purged[adapter_key]
        found = batch.txn.get(adapter_key, db=self._purged)
        return _SEQ.unpack(found)[0] if found else 1

    def _apply_purge(
        self, batch: _WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        """Remove every row of the adapter; refused while it has live revisions or no events
        (the first event of a name is always a push, so ``next_revision`` 1 means none)."""
        txn = batch.txn
        if record.next_revision == 1:
            raise rules.purge_unknown(event)
        if record.live:
            live = [
                _number_at(key, len(adapter_key))
                for key, _ in self._scan(txn, self._revisions, adapter_key, None, 10)
            ]
            raise rules.purge_live(event, live)
        # Aliases, their reverse rows and digests cannot outlive the last live revision (the
        # apply rules see to that); they are swept too so a purge leaves no row whatever came.
        for db in (self._aliases, self._revision_aliases, self._history, self._digests):
            cursor = txn.cursor(db=db)
            positioned = cursor.set_range(adapter_key)
            while positioned and cursor.key().startswith(adapter_key):
                positioned = cursor.delete()
        txn.delete(adapter_key, db=self._adapters)

    def _apply_push(
        self, batch: _WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        if event.revision != record.next_revision:
            raise rules.wrong_push_number(event, record.next_revision)
        summary = rules.PackSummary.from_manifest(event.manifest)
        digest = event.digest
        assert digest is not None
        raw = bytes.fromhex(digest.hex)
        txn = batch.txn
        value = records.encode_revision(
            algorithm_id=self._intern(batch, digest.algorithm),
            digest_raw=raw,
            size_bytes=event.size_bytes,
            created_at=event.at,
            summary=summary,
            base_id_id=self._intern(batch, summary.base_id),
            dtype_id=self._intern(batch, summary.dtype),
            modules_id=self._intern(batch, summary.target_modules),
            metadata=event.metadata,
        )
        number = keys.encode(event.revision)
        txn.put(adapter_key + number, value, db=self._revisions)
        ref_key = keys.encode(digest.algorithm, raw)
        digest_key = adapter_key + ref_key
        holders = txn.get(digest_key, db=self._digests) or b""
        txn.put(digest_key, holders + records.encode_number(event.revision), db=self._digests)
        batch.ref_deltas[ref_key] = batch.ref_deltas.get(ref_key, 0) + 1
        record.next_revision = event.revision + 1
        record.latest = event.revision
        record.live += 1

    def _apply_alias(
        self, batch: _WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        txn = batch.txn
        alias_key = adapter_key + keys.encode(event.alias)
        found = txn.get(alias_key, db=self._aliases)
        current = records.decode_number(found) if found else 0
        if event.previous != current:
            raise rules.stale_alias(event, current)
        if event.revision == 0:
            if current == 0:
                raise rules.unset_alias(event)
        elif txn.get(adapter_key + keys.encode(event.revision), db=self._revisions) is None:
            raise rules.not_live(event, record.next_revision)
        if current:
            txn.delete(adapter_key + keys.encode(current, event.alias), db=self._revision_aliases)
        if event.revision:
            txn.put(alias_key, records.encode_number(event.revision), db=self._aliases)
            txn.put(
                adapter_key + keys.encode(event.revision, event.alias),
                b"",
                db=self._revision_aliases,
            )
        else:
            txn.delete(alias_key, db=self._aliases)
        txn.put(
            adapter_key + keys.encode(event.alias, event.seq),
            records.encode_move(current, event.revision, event.at, event.principal),
            db=self._history,
        )

    def _apply_delete(
        self, batch: _WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        txn = batch.txn
        revision_key = adapter_key + keys.encode(event.revision)
        value = txn.get(revision_key, db=self._revisions)
        if value is None:
            raise rules.not_live(event, record.next_revision)
        holding = self._aliases_at(txn, adapter_key, event.revision)
        if holding:
            raise rules.aliased_delete(event, holding)
        algorithm, raw = records.revision_digest(value, self._lookup_interned(txn))
        txn.delete(revision_key, db=self._revisions)
        digest_key = adapter_key + keys.encode(algorithm, raw)
        holders = records.decode_numbers(txn.get(digest_key, db=self._digests) or b"")
        remaining = [n for n in holders if n != event.revision]
        if remaining:
            txn.put(digest_key, records.encode_numbers(remaining), db=self._digests)
        else:
            txn.delete(digest_key, db=self._digests)
        ref_key = keys.encode(algorithm, raw)
        batch.ref_deltas[ref_key] = batch.ref_deltas.get(ref_key, 0) - 1
        record.live -= 1
        if record.latest == event.revision:
            record.latest = self._highest_live_below(txn, adapter_key, event.revision)

    def _apply_metadata(
        self, batch: _WriteBatch, adapter_key: bytes, record: AdapterRecord, event: Event
    ) -> None:
        revision_key = adapter_key + keys.encode(event.revision)
        value = batch.txn.get(revision_key, db=self._revisions)
        if value is None:
            raise rules.not_live(event, record.next_revision)
        merged = records.merge_metadata(value, event.metadata, event.removed)
        batch.txn.put(revision_key, merged, db=self._revisions)

    def _highest_live_below(
        self, txn: lmdb.Transaction[bytes], adapter_key: bytes, number: int
    ) -> int:
        cursor = txn.cursor(db=self._revisions)
        found = cursor.set_range(adapter_key + keys.encode(number))
        moved = cursor.prev() if found else cursor.last()
        if moved and cursor.key().startswith(adapter_key):
            return _number_at(cursor.key(), len(adapter_key))
        return 0

    # -- reading --------------------------------------------------------------------------------

    def adapter_state(self, adapter: AdapterName) -> AdapterState | None:
        adapter_key = keys.encode(adapter.tenant, adapter.name)

        def read(txn: lmdb.Transaction[bytes]) -> AdapterState | None:
            stored = txn.get(adapter_key, db=self._adapters)
            if stored is None:
                return None
            aliases = self._adapter_aliases(txn, adapter_key)
            return AdapterRecord.decode(stored).state(adapter, aliases)

        return self._read(read)

    def next_seq(self, adapter: AdapterName) -> int:
        adapter_key = keys.encode(adapter.tenant, adapter.name)

        def read(txn: lmdb.Transaction[bytes]) -> int:
            stored = txn.get(adapter_key, db=self._adapters)
            if stored is not None:
                return AdapterRecord.decode(stored).next_seq
            found = txn.get(adapter_key, db=self._purged)
            return _SEQ.unpack(found)[0] if found else 1

        return self._read(read)

    def get_revision(self, adapter: AdapterName, number: int) -> Revision | None:
        if not 0 < number <= rules.MAX_REVISION:
            return None
        adapter_key = keys.encode(adapter.tenant, adapter.name)

        def read(txn: lmdb.Transaction[bytes]) -> Revision | None:
            stored = txn.get(adapter_key, db=self._adapters)
            value = txn.get(adapter_key + keys.encode(number), db=self._revisions)
            if stored is None or value is None:
                return None
            latest = AdapterRecord.decode(stored).latest
            return self._revision(txn, adapter, adapter_key, number, value, latest)

        return self._read(read)

    def resolve(self, ref: Ref) -> Revision:
        """The live revision ``ref`` names; ``NotFound`` naming what is missing,
        ``InvalidReference`` for an ambiguous or malformed digest prefix."""
        return self._read(lambda txn: self._resolve_in(txn, ref))

    def resolve_at_generation(self, ref: Ref) -> tuple[int | None, Revision]:
        """``resolve`` and the id of the snapshot (read transaction) it answered from."""
        return self._read(lambda txn: (txn.id(), self._resolve_in(txn, ref)))

    def _resolve_in(self, txn: lmdb.Transaction[bytes], ref: Ref) -> Revision:
        adapter = ref.adapter
        adapter_key = keys.encode(adapter.tenant, adapter.name)
        stored = txn.get(adapter_key, db=self._adapters)
        if stored is None:
            raise rules.unknown_adapter(adapter)
        record = AdapterRecord.decode(stored)
        number = self._number_of(txn, adapter_key, record, ref)
        value = txn.get(adapter_key + keys.encode(number), db=self._revisions)
        if value is None:
            raise rules.missing_revision(adapter, number, record.next_revision)
        return self._revision(txn, adapter, adapter_key, number, value, record.latest)

    def _number_of(
        self, txn: lmdb.Transaction[bytes], adapter_key: bytes, record: AdapterRecord, ref: Ref
    ) -> int:
        if ref.selector is Selector.REVISION:
            return int(ref.value)
        if ref.selector is Selector.ALIAS:
            if ref.value == LATEST:
                if not record.latest:
                    raise rules.no_live_revision(ref.adapter)
                return record.latest
            found = txn.get(adapter_key + keys.encode(ref.value), db=self._aliases)
            if found is None:
                raise rules.unknown_alias(ref.adapter, ref.value)
            return records.decode_number(found)
        return self._number_by_digest(txn, adapter_key, ref)

    def _number_by_digest(self, txn: lmdb.Transaction[bytes], adapter_key: bytes, ref: Ref) -> int:
        algorithm, hex_prefix = parse_digest_prefix(ref.value)
        # whole bytes go in the scan prefix; an odd last hex digit is checked on each match
        raw_prefix = bytes.fromhex(hex_prefix[: len(hex_prefix) // 2 * 2])
        scan = adapter_key + keys.encode(algorithm, raw_prefix)
        matches: dict[bytes, list[int]] = {}
        cursor = txn.cursor(db=self._digests)
        positioned = cursor.set_range(scan)
        while positioned:
            key = cursor.key()
            if not key.startswith(scan):
                break
            raw = key[len(scan) - len(raw_prefix) :]
            if raw.hex().startswith(hex_prefix):
                matches[raw] = records.decode_numbers(cursor.value())
            positioned = cursor.next()
        if not matches:
            raise rules.unknown_digest(ref.adapter, ref.value)
        if len(matches) > 1:
            raise rules.ambiguous_digest(ref.adapter, ref.value, len(matches))
        # identical bytes pushed twice: the newest revision holding them
        return max(next(iter(matches.values())))

    def _revision(
        self,
        txn: lmdb.Transaction[bytes],
        adapter: AdapterName,
        adapter_key: bytes,
        number: int,
        value: bytes,
        latest: int,
    ) -> Revision:
        aliases = self._aliases_at(txn, adapter_key, number)
        if number == latest:
            aliases.append(LATEST)
        return records.decode_revision(
            adapter, number, value, self._lookup_interned(txn), tuple(sorted(aliases))
        )

    def _aliases_at(
        self, txn: lmdb.Transaction[bytes], adapter_key: bytes, number: int
    ) -> list[str]:
        scan = adapter_key + keys.encode(number)
        found: list[str] = []
        cursor = txn.cursor(db=self._revision_aliases)
        positioned = cursor.set_range(scan)
        while positioned:
            key = cursor.key()
            if not key.startswith(scan):
                break
            found.append(_str_at(key, len(scan)))
            positioned = cursor.next()
        return found

    def _adapter_aliases(self, txn: lmdb.Transaction[bytes], adapter_key: bytes) -> dict[str, int]:
        found: dict[str, int] = {}
        cursor = txn.cursor(db=self._aliases)
        positioned = cursor.set_range(adapter_key)
        while positioned:
            key = cursor.key()
            if not key.startswith(adapter_key):
                break
            found[_str_at(key, len(adapter_key))] = records.decode_number(cursor.value())
            positioned = cursor.next()
        return found

    def list_adapters(
        self, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[AdapterSummary]:
        """Adapters in ``(tenant, name)`` order; ``InvalidName`` for a bad prefix,
        ``InvalidArgument`` for a bad page size or a token not from this listing."""
        scan = keys.prefix(*paging.adapter_prefix(prefix))
        size = paging.page_size_of(page_size)
        after = paging.decode_token(page_token, scan) if page_token else None

        def read(txn: lmdb.Transaction[bytes]) -> Page[AdapterSummary]:
            rows = list(self._scan(txn, self._adapters, scan, after, size + 1))
            items: list[AdapterSummary] = []
            for key, value in rows[:size]:
                tenant, name = keys.decode(key)
                record = AdapterRecord.decode(value)
                items.append(
                    AdapterSummary(
                        adapter=AdapterName(str(tenant), str(name)),
                        latest=record.latest,
                        revision_count=record.live,
                        aliases=self._adapter_aliases(txn, key),
                        created_at=record.created_at,
                        updated_at=record.updated_at,
                    )
                )
            return Page(tuple(items), _next_token(rows, size))

        return self._read(read)

    def list_revisions(
        self, adapter: AdapterName, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[Revision]:
        """Live revisions in increasing number; ``NotFound`` for an unknown adapter,
        ``InvalidArgument`` for a bad page size or token."""
        adapter_key = keys.encode(adapter.tenant, adapter.name)
        size = paging.page_size_of(page_size)
        after = paging.decode_token(page_token, adapter_key) if page_token else None

        def read(txn: lmdb.Transaction[bytes]) -> Page[Revision]:
            stored = txn.get(adapter_key, db=self._adapters)
            if stored is None:
                raise rules.unknown_adapter(adapter)
            latest = AdapterRecord.decode(stored).latest
            by_number: dict[int, list[str]] = {}
            for alias, number in self._adapter_aliases(txn, adapter_key).items():
                by_number.setdefault(number, []).append(alias)
            lookup = self._lookup_interned(txn)
            rows = list(self._scan(txn, self._revisions, adapter_key, after, size + 1))
            items: list[Revision] = []
            for key, value in rows[:size]:
                number = _number_at(key, len(adapter_key))
                aliases = list(by_number.get(number, ()))
                if number == latest:
                    aliases.append(LATEST)
                items.append(
                    records.decode_revision(adapter, number, value, lookup, tuple(sorted(aliases)))
                )
            return Page(tuple(items), _next_token(rows, size))

        return self._read(read)

    @staticmethod
    def _scan(
        txn: lmdb.Transaction[bytes], db: Any, scan: bytes, after: bytes | None, limit: int
    ) -> Iterator[tuple[bytes, bytes]]:
        """Up to ``limit`` (key, value) pairs under ``scan``, strictly after ``after``."""
        cursor = txn.cursor(db=db)
        positioned = cursor.set_range(after if after is not None else scan)
        if positioned and after is not None and cursor.key() == after:
            positioned = cursor.next()
        while positioned and limit > 0:
            key = cursor.key()
            if not key.startswith(scan):
                return
            yield key, cursor.value()
            limit -= 1
            positioned = cursor.next()

    def alias_history(self, adapter: AdapterName, alias: str | None = None) -> list[AliasMove]:
        """Moves oldest first; ``NotFound`` for an unknown adapter, ``InvalidName`` for a bad
        alias. ``latest`` is derived, not moved by events, so it has no history."""
        adapter_key = keys.encode(adapter.tenant, adapter.name)
        scan = adapter_key
        if alias is not None:
            scan += keys.encode(check_name_part("alias", alias))

        def read(txn: lmdb.Transaction[bytes]) -> list[AliasMove]:
            if txn.get(adapter_key, db=self._adapters) is None:
                raise rules.unknown_adapter(adapter)
            moves: list[AliasMove] = []
            for key, value in self._scan(txn, self._history, scan, None, 1 << 62):
                name, seq = keys.decode(key[len(adapter_key) :])
                previous, revision, at, principal = records.decode_move(value)
                moves.append(
                    AliasMove(adapter, str(name), previous, revision, at, int(seq), principal)
                )
            moves.sort(key=lambda move: move.seq)
            return moves

        return self._read(read)

    # -- blobs ----------------------------------------------------------------------------------

    def referenced_digests(self) -> Iterator[tuple[Digest, int]]:
        """Every referenced blob with its live revision count, read in short transactions so a
        slow consumer (GC) never holds one open."""
        after: bytes | None = None
        while True:

            def read(
                txn: lmdb.Transaction[bytes], after: bytes | None = after
            ) -> list[tuple[bytes, int]]:
                return [
                    (key, records.decode_number(value))
                    for key, value in self._scan(txn, self._blob_refs, b"", after, _REFS_CHUNK)
                ]

            chunk = self._read(read)
            for key, count in chunk:
                algorithm, raw = keys.decode(key)
                assert isinstance(raw, bytes)
                yield Digest(str(algorithm), raw.hex()), count
            if len(chunk) < _REFS_CHUNK:
                return
            after = chunk[-1][0]

    def digest_refcount(self, digest: Digest) -> int:
        ref_key = keys.encode(digest.algorithm, bytes.fromhex(digest.hex))

        def read(txn: lmdb.Transaction[bytes]) -> int:
            found = txn.get(ref_key, db=self._blob_refs)
            return records.decode_number(found) if found else 0

        return self._read(read)

    # -- intents --------------------------------------------------------------------------------

    def add_intent(self, event: Event) -> None:
        """Record ``event`` as about to be written durably; ``InvalidArgument`` if malformed."""
        rules.check_event_shape(event)
        key = keys.encode(event.adapter.tenant, event.adapter.name, event.seq)
        data = event.encode()

        def write(batch: _WriteBatch) -> None:
            batch.txn.put(key, data, db=self._intents)

        self._write(write)

    def drop_intent(self, adapter: AdapterName, seq: int) -> None:
        key = keys.encode(adapter.tenant, adapter.name, seq)

        def write(batch: _WriteBatch) -> None:
            batch.txn.delete(key, db=self._intents)

        self._write(write)

    def intents(self) -> list[Event]:
        def read(txn: lmdb.Transaction[bytes]) -> list[Event]:
            return [
                Event.decode(value, key=repr(keys.decode(key)))
                for key, value in txn.cursor(db=self._intents)
            ]

        return self._read(read)

    # -- housekeeping ---------------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """``adapters``, ``revisions`` (live), ``aliases`` (explicit), ``intents``, ``blobs``
        (distinct referenced digests), ``bytes_on_disk`` (data file size), ``bytes_used`` (pages
        in use) and ``map_size``."""

        def read(txn: lmdb.Transaction[bytes]) -> dict[str, Any]:
            info = self._env.info()
            page = int(self._env.stat()["psize"])
            return {
                "adapters": txn.stat(self._adapters)["entries"],
                "revisions": txn.stat(self._revisions)["entries"],
                "aliases": txn.stat(self._aliases)["entries"],
                "intents": txn.stat(self._intents)["entries"],
                "blobs": txn.stat(self._blob_refs)["entries"],
                "purged": txn.stat(self._purged)["entries"],
                "bytes_on_disk": (self.path / "data.mdb").stat().st_size,
                "bytes_used": (int(info["last_pgno"]) + 1) * page,
                "map_size": int(info["map_size"]),
            }

        return self._read(read)

    def close(self) -> None:
        """Release the environment; later calls raise ``FailedPrecondition``. Idempotent."""
        with self._write_lock, self._gate.exclusive():
            if self._gate.closed:
                return
            self._gate.closed = True
            self._env.close()

    def __enter__(self) -> LmdbIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _end_failed(txn: lmdb.Transaction[bytes]) -> None:
    """End a transaction that LMDB has marked failed, without ``abort()`` (see ``_write_once``)."""
    try:
        txn.commit()
    except lmdb.BadTxnError:
        return
    raise Internal("LMDB committed a transaction that had failed; the index may be inconsistent")


def _number_at(key: bytes, offset: int) -> int:
    """The int part starting at ``offset`` of a key (skipping its tag byte)."""
    return int.from_bytes(key[offset + 1 : offset + _NUMBER_TAG_WIDTH], "big")


def _str_at(key: bytes, offset: int) -> str:
    """The string part starting at ``offset`` of a key (skipping its tag byte)."""
    return key[offset + 1 : key.index(b"\x00", offset + 1)].decode()


def _next_token(rows: list[tuple[bytes, bytes]], size: int) -> str:
    """A token after the page's last row when the scan found one row more than the page."""
    return paging.encode_token(rows[size - 1][0]) if len(rows) > size else ""
