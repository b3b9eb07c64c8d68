"""The catalog index's LMDB environment: opening it, the schema check, read and write
transactions, and growing the map.

:class:`~catalog.index.lmdb_index.LmdbIndex` runs every transaction through
:class:`IndexEnvironment` and never opens, resizes or closes LMDB itself. The map starts at
``map_size`` and doubles (up to ``max_map_size``) whenever LMDB reports it full, with every
transaction of this process held off while it grows
(:class:`~catalog.index.resize_gate.ResizeGate`), as ``mdb_env_set_mapsize`` requires.

It shares the schema check, map doubling and ending a failed write with the pack cache's
environment (:mod:`catalog.lmdb_env`) and differs from it on purpose:

- another process may have the index open and grow its map: a transaction that finds it
  grown (``MapResizedError``) adopts the new size and is retried; the pack cache has one
  writer process, holding a directory lock.
- the gate is lock-free (see ``ResizeGate``): index reads take microseconds.
- ``Transaction.abort()`` of a write transaction stalls in py-lmdb 3.0 while other threads run
  read transactions (see :func:`~catalog.lmdb_env.end_failed_write`), so a write here ends by
  a commit in every expected case, a refused event included: the index's event handlers check
  before their first write, which the pack cache's writes do not promise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import lmdb

from catalog.errors import CatalogError
from catalog.index.lmdb_layout import SCHEMA_KEY, SCHEMA_VERSION, Databases
from catalog.index.resize_gate import ResizeGate
from catalog.lmdb_env import check_schema, end_failed_write, grow_map

__all__ = ["IndexEnvironment"]

T = TypeVar("T")
W = TypeVar("W")
if TYPE_CHECKING:
    Txn = lmdb.Transaction[bytes]  # values are bytes: every transaction uses buffers=False


class IndexEnvironment:
    """The LMDB environment in directory ``path`` (created if missing), shared by threads.

    Raises ``FailedPrecondition`` if the directory holds an index of another schema version.
    """

    def __init__(
        self, path: Path, *, map_size: int, max_map_size: int, sync: bool, max_readers: int
    ) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self._max_map_size = max(max_map_size, map_size)
        self.lmdb = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=Databases.COUNT + 2,
            max_readers=max_readers,
            sync=sync,
            metasync=sync,
            meminit=False,
        )
        self._gate = ResizeGate()
        # Held across a whole write, its retries included: LMDB has one writer anyway.
        self._write_lock = threading.Lock()
        try:
            self.dbs = Databases.open(self.lmdb)
            with self.lmdb.begin(write=True) as txn:
                check_schema(
                    txn,
                    self.dbs.meta,
                    SCHEMA_KEY,
                    SCHEMA_VERSION,
                    f"index at {self.path}",
                    "rebuild it with reindex",
                )
        except BaseException:
            self.lmdb.close()
            raise

    def read(self, work: Callable[[Txn], T]) -> T:
        """Run ``work`` in a read-only transaction (values are bytes, copied out).

        Retried when another process grew the map. Raises ``FailedPrecondition`` once closed,
        and what ``work`` raises.
        """
        while True:
            self._gate.enter()
            try:
                with self.lmdb.begin(buffers=False) as txn:
                    return work(txn)
            except lmdb.MapResizedError:
                pass  # another process grew the map; adopt its size and retry
            finally:
                self._gate.leave()
            self._adopt_map_size()

    def write(
        self,
        work: Callable[[Txn], W],
        finish: Callable[[W], None],
        committed: Callable[[W], None],
    ) -> W:
        """Run ``work`` then ``finish`` in one write transaction and commit, then call
        ``committed``; returns what ``work`` returned.

        ``work`` may refuse (raise a ``CatalogError``) only before its first write: the empty
        transaction is then committed and the error raised. Whatever ``finish`` raises, or
        anything else ``work`` raises, discards the transaction. A full map is grown and the
        whole write retried (``work`` must be safe to run again), as is a map another process
        grew. ``committed`` runs before the next write can begin (the index publishes the
        intern ids the write allocated there).

        Raises ``ResourceExhausted`` at ``max_map_size``, ``FailedPrecondition`` once closed,
        and what ``work`` or ``finish`` raises.
        """
        with self._write_lock:
            while True:
                self._gate.enter()
                try:
                    result = self._write_once(work, finish)
                    committed(result)
                    return result
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

    def _write_once(self, work: Callable[[Txn], W], finish: Callable[[W], None]) -> W:
        """One write transaction, ended by commit wherever that is correct.

        ``abort()`` stalls in py-lmdb 3.0 beside busy readers (see the module docstring), so
        the expected endings avoid it: a refused event has written nothing, so its empty
        transaction is committed; a transaction that hit a full map is ended by a commit that
        LMDB refuses (:func:`~catalog.lmdb_env.end_failed_write`). Only an unexpected failure,
        with writes possibly half done, pays for ``abort()``.
        """
        txn = self.lmdb.begin(write=True, buffers=False)
        ended = False
        try:
            try:
                result = work(txn)
            except CatalogError:
                ended = True
                txn.commit()
                raise
            finish(result)
            ended = True
            txn.commit()
        except (lmdb.MapFullError, lmdb.MapResizedError):
            if not ended:
                end_failed_write(txn, "the index")
            raise
        except BaseException:
            if not ended:
                txn.abort()
            raise
        return result

    def _grow_map(self) -> None:
        with self._gate.exclusive():
            grow_map(self.lmdb, self._max_map_size, f"index at {self.path}")

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            self.lmdb.set_mapsize(0)

    def close(self) -> None:
        """Release the environment; later transactions raise ``FailedPrecondition``.
        Idempotent."""
        with self._write_lock, self._gate.exclusive():
            if self._gate.closed:
                return
            self._gate.closed = True
            self.lmdb.close()
