"""The catalog index on an LMDB environment: the one :class:`RevisionIndex` meant for production.

Every event is applied in one write transaction that validates first and writes second, so a
refused event leaves nothing behind. Reads run in read-only transactions and copy values out
before the transaction ends.

This module is the public class; its parts each have a module:

- :mod:`catalog.index.lmdb_layout`: the named sub-databases and their keys (the layout table).
- :mod:`catalog.index.environment`: opening the environment, the schema check, read and write
  transactions, map growth (by this process or another), closing.
- :mod:`catalog.index.lmdb_batch`: one write batch, what it writes at its end, interning.
- :mod:`catalog.index.lmdb_apply`: the event handlers (push, alias, delete, metadata, purge).
- :mod:`catalog.index.lmdb_reads`: resolving references and building revisions in a read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from catalog import keys
from catalog.digest import Digest
from catalog.events import Event
from catalog.index import paging, records, rules
from catalog.index.base import (
    DEFAULT_PAGE_SIZE,
    AdapterState,
    RevisionIndex,
)
from catalog.index.environment import IndexEnvironment
from catalog.index.lmdb_apply import EventApplier
from catalog.index.lmdb_batch import Interner, WriteBatch, flush
from catalog.index.lmdb_layout import SCHEMA_VERSION, SEQ, number_at, scan
from catalog.index.lmdb_reads import IndexReads
from catalog.index.records import AdapterRecord
from catalog.model import (
    LATEST,
    AdapterName,
    AdapterSummary,
    AliasMove,
    Page,
    Ref,
    Revision,
)
from catalog.model import check_part as check_name_part

if TYPE_CHECKING:
    from catalog.index.environment import Txn

__all__ = [
    "DEFAULT_BATCH_EVENTS",
    "DEFAULT_MAP_SIZE",
    "DEFAULT_MAX_MAP_SIZE",
    "SCHEMA_VERSION",
    "LmdbIndex",
]

DEFAULT_MAP_SIZE = 1 << 30  # sparse on Linux: address space, not disk, until pages are written
DEFAULT_MAX_MAP_SIZE = 1 << 40
DEFAULT_BATCH_EVENTS = 20_000  # events per write transaction in apply_many
_REFS_CHUNK = 1024

T = TypeVar("T")


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
        self._batch_events = max(1, batch_events)
        self._env = IndexEnvironment(
            self.path,
            map_size=map_size,
            max_map_size=max_map_size,
            sync=sync,
            max_readers=max_readers,
        )
        self._dbs = self._env.dbs
        self._interner = Interner(self._dbs)
        self._reads = IndexReads(self._dbs, self._interner)
        self._applier = EventApplier(self._dbs, self._interner, self._reads)
        try:
            self._env.read(self._interner.load)
        except BaseException:
            self._env.close()
            raise

    # -- transactions ---------------------------------------------------------------------------

    def _read(self, work: Callable[[Txn], T]) -> T:
        return self._env.read(work)

    def _write(self, work: Callable[[WriteBatch], T]) -> T:
        """Run ``work`` in one write batch; see :meth:`IndexEnvironment.write` for how it ends."""

        def run(txn: Txn) -> tuple[WriteBatch, T]:
            batch = WriteBatch(txn, self._dbs.intents)
            return batch, work(batch)

        def finish(done: tuple[WriteBatch, T]) -> None:
            flush(done[0], self._dbs)

        def committed(done: tuple[WriteBatch, T]) -> None:
            self._interner.publish(done[0])

        return self._env.write(run, finish, committed)[1]

    # -- applying events ------------------------------------------------------------------------

    def generation(self) -> int:
        """The id of the last committed write transaction (any process's)."""
        return self._read(lambda txn: txn.id())

    def apply(self, event: Event) -> None:
        """Apply ``event`` in one write transaction and clear its intent; see the ABC for errors."""
        rules.check_event_shape(event)
        self._write(lambda batch: self._applier.apply_one(batch, event))

    def apply_many(self, events: Iterable[Event]) -> int:
        """Apply events in order, ``batch_events`` per write transaction.

        On a refused event the events before it stay applied (committed) and the error is
        raised, exactly as applying them one by one would.
        """
        applied = 0
        stream = iter(events)
        while batch_events := list(islice(stream, self._batch_events)):
            done, error = self._write(lambda batch: self._applier.apply_batch(batch, batch_events))
            applied += done
            if error is not None:
                raise error
        return applied

    # -- reading --------------------------------------------------------------------------------

    def adapter_state(self, adapter: AdapterName) -> AdapterState | None:
        adapter_key = keys.encode(adapter.tenant, adapter.name)

        def read(txn: Txn) -> AdapterState | None:
            stored = txn.get(adapter_key, db=self._dbs.adapters)
            if stored is None:
                return None
            aliases = self._reads.adapter_aliases(txn, adapter_key)
            return AdapterRecord.decode(stored).state(adapter, aliases)

        return self._read(read)

    def next_seq(self, adapter: AdapterName) -> int:
        adapter_key = keys.encode(adapter.tenant, adapter.name)

        def read(txn: Txn) -> int:
            stored = txn.get(adapter_key, db=self._dbs.adapters)
            if stored is not None:
                return AdapterRecord.decode(stored).next_seq
            found = txn.get(adapter_key, db=self._dbs.purged)
            return SEQ.unpack(found)[0] if found else 1

        return self._read(read)

    def get_revision(self, adapter: AdapterName, number: int) -> Revision | None:
        if not 0 < number <= rules.MAX_REVISION:
            return None
        adapter_key = keys.encode(adapter.tenant, adapter.name)

        def read(txn: Txn) -> Revision | None:
            stored = txn.get(adapter_key, db=self._dbs.adapters)
            value = txn.get(adapter_key + keys.encode(number), db=self._dbs.revisions)
            if stored is None or value is None:
                return None
            latest = AdapterRecord.decode(stored).latest
            return self._reads.revision(txn, adapter, adapter_key, number, value, latest)

        return self._read(read)

    def resolve(self, ref: Ref) -> Revision:
        """The live revision ``ref`` names; ``NotFound`` naming what is missing,
        ``InvalidReference`` for an ambiguous or malformed digest prefix."""
        return self._read(lambda txn: self._reads.resolve(txn, ref))

    def resolve_at_generation(self, ref: Ref) -> tuple[int | None, Revision]:
        """``resolve`` and the id of the snapshot (read transaction) it answered from."""
        return self._read(lambda txn: (txn.id(), self._reads.resolve(txn, ref)))

    def list_adapters(
        self, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[AdapterSummary]:
        """Adapters in ``(tenant, name)`` order; ``InvalidName`` for a bad prefix,
        ``InvalidArgument`` for a bad page size or a token not from this listing."""
        under = keys.prefix(*paging.adapter_prefix(prefix))
        size = paging.page_size_of(page_size)
        after = paging.decode_token(page_token, under) if page_token else None

        def read(txn: Txn) -> Page[AdapterSummary]:
            rows = list(scan(txn, self._dbs.adapters, under, after, size + 1))
            items: list[AdapterSummary] = []
            for key, value in rows[:size]:
                tenant, name = keys.decode(key)
                record = AdapterRecord.decode(value)
                items.append(
                    AdapterSummary(
                        adapter=AdapterName(str(tenant), str(name)),
                        latest=record.latest,
                        revision_count=record.live,
                        aliases=self._reads.adapter_aliases(txn, key),
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

        def read(txn: Txn) -> Page[Revision]:
            stored = txn.get(adapter_key, db=self._dbs.adapters)
            if stored is None:
                raise rules.unknown_adapter(adapter)
            latest = AdapterRecord.decode(stored).latest
            by_number: dict[int, list[str]] = {}
            for alias, number in self._reads.adapter_aliases(txn, adapter_key).items():
                by_number.setdefault(number, []).append(alias)
            lookup = self._interner.lookup(txn)
            rows = list(scan(txn, self._dbs.revisions, adapter_key, after, size + 1))
            items: list[Revision] = []
            for key, value in rows[:size]:
                number = number_at(key, len(adapter_key))
                aliases = list(by_number.get(number, ()))
                if number == latest:
                    aliases.append(LATEST)
                items.append(
                    records.decode_revision(adapter, number, value, lookup, tuple(sorted(aliases)))
                )
            return Page(tuple(items), _next_token(rows, size))

        return self._read(read)

    def alias_history(self, adapter: AdapterName, alias: str | None = None) -> list[AliasMove]:
        """Moves oldest first; ``NotFound`` for an unknown adapter, ``InvalidName`` for a bad
        alias. ``latest`` is derived, not moved by events, so it has no history."""
        adapter_key = keys.encode(adapter.tenant, adapter.name)
        under = adapter_key
        if alias is not None:
            under += keys.encode(check_name_part("alias", alias))

        def read(txn: Txn) -> list[AliasMove]:
            if txn.get(adapter_key, db=self._dbs.adapters) is None:
                raise rules.unknown_adapter(adapter)
            moves: list[AliasMove] = []
            for key, value in scan(txn, self._dbs.history, under, None, 1 << 62):
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

            def read(txn: Txn, after: bytes | None = after) -> list[tuple[bytes, int]]:
                return [
                    (key, records.decode_number(value))
                    for key, value in scan(txn, self._dbs.blob_refs, b"", after, _REFS_CHUNK)
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

        def read(txn: Txn) -> int:
            found = txn.get(ref_key, db=self._dbs.blob_refs)
            return records.decode_number(found) if found else 0

        return self._read(read)

    # -- intents --------------------------------------------------------------------------------

    def add_intent(self, event: Event) -> None:
        """Record ``event`` as about to be written durably; ``InvalidArgument`` if malformed."""
        rules.check_event_shape(event)
        key = keys.encode(event.adapter.tenant, event.adapter.name, event.seq)
        data = event.encode()

        def write(batch: WriteBatch) -> None:
            batch.txn.put(key, data, db=self._dbs.intents)

        self._write(write)

    def drop_intent(self, adapter: AdapterName, seq: int) -> None:
        key = keys.encode(adapter.tenant, adapter.name, seq)

        def write(batch: WriteBatch) -> None:
            batch.txn.delete(key, db=self._dbs.intents)

        self._write(write)

    def intents(self) -> list[Event]:
        def read(txn: Txn) -> list[Event]:
            return [
                Event.decode(value, key=repr(keys.decode(key)))
                for key, value in txn.cursor(db=self._dbs.intents)
            ]

        return self._read(read)

    # -- housekeeping ---------------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """``adapters``, ``revisions`` (live), ``aliases`` (explicit), ``intents``, ``blobs``
        (distinct referenced digests), ``bytes_on_disk`` (data file size), ``bytes_used`` (pages
        in use) and ``map_size``."""

        def read(txn: Txn) -> dict[str, Any]:
            info = self._env.lmdb.info()
            page = int(self._env.lmdb.stat()["psize"])
            return {
                "adapters": txn.stat(self._dbs.adapters)["entries"],
                "revisions": txn.stat(self._dbs.revisions)["entries"],
                "aliases": txn.stat(self._dbs.aliases)["entries"],
                "intents": txn.stat(self._dbs.intents)["entries"],
                "blobs": txn.stat(self._dbs.blob_refs)["entries"],
                "purged": txn.stat(self._dbs.purged)["entries"],
                "bytes_on_disk": (self.path / "data.mdb").stat().st_size,
                "bytes_used": (int(info["last_pgno"]) + 1) * page,
                "map_size": int(info["map_size"]),
            }

        return self._read(read)

    def close(self) -> None:
        """Release the environment; later calls raise ``FailedPrecondition``. Idempotent."""
        self._env.close()

    def __enter__(self) -> LmdbIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _next_token(rows: list[tuple[bytes, bytes]], size: int) -> str:
    """A token after the page's last row when the scan found one row more than the page."""
    return paging.encode_token(rows[size - 1][0]) if len(rows) > size else ""
