"""The LMDB environment of one pack cache directory, as its one writer process holds it.

:class:`~catalog.cache.pack_cache.PackCache` keeps its bytes here and never touches LMDB
otherwise. This class owns what is about the environment rather than about packs: the
directory lock that makes its opener the only writer, the schema check and the instance id
that readers in other processes compare, the named sub-databases, read and write
transactions, growing the map when a write finds it full, and closing.

Every transaction holds ``_gate`` shared; growing the map takes it exclusively, as
``mdb_env_set_mapsize`` requires (no transaction may be open in this process meanwhile).
Closing takes it exclusively too, so no transaction is cut short.

Why this is not the index's environment (:mod:`catalog.index.environment`), which shares only
:mod:`catalog.lmdb_env` with it: the cache has one writer process (the directory lock), so no
other process grows its map and ``MapResizedError`` never comes; its gate is a plain
:class:`~catalog.locks.ReadWriteLock` (a read here moves chunk bytes, so the lock is a small
part of it; the index's reads are microseconds and needed a lock-free gate); and only a full
map ends a write without ``abort()``, since a cache write may fail after writing (see
:meth:`CacheEnvironment.write`).
"""

from __future__ import annotations

import fcntl
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import lmdb

from catalog.cache.chunk_reads import Tables
from catalog.cache.chunk_writes import MAP_ALIGN
from catalog.cache.layout import (
    CHUNKS_DB,
    DATA_FILE,
    ENTRIES_DB,
    INFO_DB,
    INSTANCE_KEY,
    SCHEMA_KEY,
    SCHEMA_VERSION,
)
from catalog.errors import FailedPrecondition, InvalidArgument, Unavailable
from catalog.lmdb_env import check_schema, end_failed_write, grow_map
from catalog.locks import ReadWriteLock

__all__ = ["CacheEnvironment"]

_LOCK_FILE = "cache.lock"

T = TypeVar("T")
if TYPE_CHECKING:
    Txn = lmdb.Transaction[Any]  # reads use buffers=True: values are memoryviews


class CacheEnvironment:
    """The directory's LMDB environment, opened for writing by this process alone.

    Thread safe: transactions from many threads may run at once (the caller serialises its
    writers; LMDB would anyway).
    """

    def __init__(self, path: Path, *, map_size: int, max_map_size: int, sync: bool) -> None:
        """Open (creating if missing) the environment in directory ``path``.

        Args:
            map_size: the initial LMDB map (address space, not disk), or the data file's size
                when that is larger. It doubles whenever a write finds it full...
            max_map_size: ...up to this; beyond it writes raise ``ResourceExhausted``.
            sync: fsync each commit (see ``PackCache``).

        Raises:
            InvalidArgument: a map size below ``MAP_ALIGN``, or ``max_map_size`` below
                ``map_size``.
            FailedPrecondition: another process (or another environment in this one) has the
                directory open, or it holds a cache of another schema version.
            Unavailable: the directory or its LMDB environment cannot be opened.
        """
        for label, value in (("map_size", map_size), ("max_map_size", max_map_size)):
            if type(value) is not int or value < MAP_ALIGN:
                raise InvalidArgument(f"{label} must be an integer of at least {MAP_ALIGN} bytes")
        if max_map_size < map_size:
            raise InvalidArgument(f"max_map_size {max_map_size} is below map_size {map_size}")
        self.path = path
        self._max_map_size = max_map_size
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create pack cache directory {path}: {exc}") from exc
        self._lock_file = self._lock_directory()
        try:
            existing = self.data_file_bytes()
            self.lmdb = lmdb.open(
                str(path),
                map_size=max(map_size, existing),
                max_dbs=4,
                max_readers=1024,
                sync=sync,
                metasync=sync,
                meminit=False,
            )
        except lmdb.Error as exc:
            self._lock_file.close()
            raise Unavailable(f"cannot open the pack cache LMDB in {path}: {exc}") from exc
        self._gate = ReadWriteLock()
        self.closed = False
        try:
            self.chunks = self.lmdb.open_db(CHUNKS_DB)
            self.entries = self.lmdb.open_db(ENTRIES_DB)
            self.tables = Tables(self.chunks, self.entries)
            self._info = self.lmdb.open_db(INFO_DB)
            #: A random id kept in the environment: readers in other processes check it.
            self.instance_id = self._check_schema()
        except BaseException:
            self.lmdb.close()
            self._lock_file.close()
            raise

    def _lock_directory(self) -> IO[bytes]:
        lock_file = open(self.path / _LOCK_FILE, "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise FailedPrecondition(
                f"pack cache directory {self.path} is already open (in this or another process)"
            ) from None
        return lock_file

    def _check_schema(self) -> str:
        """Record the schema and an instance id in a new environment; check an old one's.
        Returns the instance id."""
        with self.lmdb.begin(write=True) as txn:
            check_schema(
                txn,
                self._info,
                SCHEMA_KEY,
                SCHEMA_VERSION,
                f"pack cache at {self.path}",
                "delete the directory to start empty",
            )
            instance = txn.get(INSTANCE_KEY, db=self._info)
            if instance is None:
                instance = secrets.token_hex(16).encode()
                txn.put(INSTANCE_KEY, instance, db=self._info)
            return bytes(instance).decode()

    def check_open(self) -> None:
        """Raises ``FailedPrecondition`` once the environment is closed."""
        if self.closed:
            raise FailedPrecondition(f"the pack cache at {self.path} is closed")

    def read(self, work: Callable[[Txn], T]) -> T:
        """Run ``work`` in one read transaction (values are memoryviews, valid inside it).

        Raises ``FailedPrecondition`` when closed, and what ``work`` or LMDB raises.
        """
        with self._gate.shared():
            self.check_open()
            with self.lmdb.begin(buffers=True) as txn:
                return work(txn)

    def write(self, work: Callable[[Txn], T]) -> T:
        """Run ``work`` in one write transaction, growing the map when it is full.

        The caller serialises its writes. Raises ``ResourceExhausted`` at ``max_map_size``,
        ``FailedPrecondition`` when closed, and what ``work`` or LMDB raises (its writes
        discarded).
        """
        while True:
            with self._gate.shared():
                self.check_open()
                try:
                    return self._write_once(work)
                except lmdb.MapFullError:
                    pass  # nothing was written
            self._grow_map()

    def _write_once(self, work: Callable[[Txn], T]) -> T:
        """One try of ``work`` in a write transaction, committed unless something fails.

        A full map, the expected failure, ends the transaction without ``abort()``
        (:func:`~catalog.lmdb_env.end_failed_write`: py-lmdb 3.0's abort stalls for seconds
        beside busy reader threads; ``tests/cache/test_environment.py`` shows it). Any other
        failure may come after some writes (``install_entry`` deletes victims before it can
        refuse a pack), so it pays for ``abort()``: unlike the index's handlers, no cache
        write promises to check before it writes.
        """
        txn = self.lmdb.begin(write=True)
        ended = False
        try:
            result = work(txn)
            ended = True
            txn.commit()  # a commit that fails has been aborted by LMDB
        except lmdb.MapFullError:
            if not ended:
                end_failed_write(txn, f"the pack cache at {self.path}")
            raise
        except BaseException:
            if not ended:
                txn.abort()
            raise
        return result

    def _grow_map(self) -> None:
        with self._gate.exclusive():
            grow_map(self.lmdb, self._max_map_size, f"pack cache at {self.path}")

    def clear_stale_readers(self) -> int:
        """Free the reader slots of processes that died mid-read; returns how many.

        Raises ``FailedPrecondition`` when closed.
        """
        with self._gate.shared():
            self.check_open()
            return int(self.lmdb.reader_check())

    def map_size(self) -> int:
        """The current LMDB map size; 0 once closed."""
        with self._gate.shared():
            return 0 if self.closed else int(self.lmdb.info()["map_size"])

    def data_file_bytes(self) -> int:
        """The size of the LMDB data file on disk; 0 when there is none yet."""
        data_file = self.path / DATA_FILE
        return data_file.stat().st_size if data_file.exists() else 0

    def close(self) -> None:
        """Close the environment and release the directory lock. Idempotent."""
        with self._gate.exclusive():
            if self.closed:
                return
            self.closed = True
            self.lmdb.close()
            self._lock_file.close()
