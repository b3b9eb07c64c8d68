"""The catalog's NVMe tier environment, opened read-only in an engine's process.

Owns where the colocated reads come from and whether they may: the checks that the tier the
catalog named (``GetPackCacheLocation``) is on this host, not in this very process, and is
the environment the catalog uses (its instance id), and the one LMDB handle per directory
that every reader of this process shares. It reads no pack: that is
``catalog.client.tier_reader``.

LMDB allows any number of reader processes beside its one writer, but forbids one process to
open an environment twice (closing either copy drops the process's locks on ``lock.mdb``), so
the handle is counted and shared; the catalog may grow its map meanwhile, which a reader
adopts under the handle's gate.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from catalog.cache.chunk_reads import Tables
from catalog.cache.layout import CHUNKS_DB, ENTRIES_DB, INFO_DB, INSTANCE_KEY, host_id
from catalog.locks import ReadWriteLock

if TYPE_CHECKING:
    _Txn = lmdb.Transaction[Any]

__all__ = ["CacheLocation", "NotColocated", "SharedEnvironment", "open_environment"]


class NotColocated(Exception):
    """The catalog's NVMe tier cannot be read from this process; the message says why."""


@dataclass(frozen=True, slots=True)
class CacheLocation:
    """What ``GetPackCacheLocation`` answered."""

    cache_dir: str
    instance_id: str
    host_id: str
    pid: int


class SharedEnvironment:
    """One read-only LMDB environment per directory per process, shared by every reader.

    LMDB's locking breaks when one process opens an environment twice (closing either copy
    drops the process's locks on ``lock.mdb``), so every client of this process reads through
    the one handle, counted, and the last ``release`` closes it.
    """

    _lock = threading.Lock()
    _open: dict[str, SharedEnvironment] = {}

    def __init__(self, path: str) -> None:
        """Open the environment at ``path`` read-only (use :meth:`acquire`).

        Raises:
            lmdb.Error: not an environment with the tier's tables, or not readable here.
        """
        self.path = path
        self.users = 0
        #: Transactions hold it shared; adopting a map the catalog grew holds it exclusively.
        self.gate = ReadWriteLock()
        self.env = lmdb.open(
            path,
            readonly=True,
            lock=True,
            create=False,
            max_dbs=4,
            max_readers=1024,
        )
        try:
            self.tables = Tables(
                self.env.open_db(CHUNKS_DB, create=False),
                self.env.open_db(ENTRIES_DB, create=False),
            )
            self.info = self.env.open_db(INFO_DB, create=False)
        except BaseException:
            self.env.close()
            raise

    @classmethod
    def acquire(cls, path: str) -> SharedEnvironment:
        """This process's handle on the environment at ``path``, opened on first use.

        Raises:
            lmdb.Error, OSError: it cannot be opened read-only here.
        """
        with cls._lock:
            shared = cls._open.get(path)
            if shared is None:
                shared = cls._open[path] = cls(path)
            shared.users += 1
            return shared

    def release(self) -> None:
        """One user fewer; the last closes the environment."""
        with SharedEnvironment._lock:
            self.users -= 1
            if self.users == 0:
                del SharedEnvironment._open[self.path]
                with self.gate.exclusive():
                    self.env.close()

    def begin(self) -> _Txn:
        """A read transaction with zero-copy values; the caller holds ``gate`` shared."""
        return self.env.begin(buffers=True)

    def adopt_grown_map(self) -> None:
        """Take the map size the catalog (the writer) set since this handle opened."""
        with self.gate.exclusive():
            self.env.set_mapsize(0)  # 0: take the size the writer set


def open_environment(location: CacheLocation) -> SharedEnvironment:
    """This process's handle on the NVMe tier at ``location``, if this process can read it;
    the caller ``release``\\ s it.

    Raises:
        NotColocated: another host, the catalog's own process, or an environment that cannot
            be opened read-only here or is not the one the catalog named.
    """
    if not location.cache_dir:
        raise NotColocated("the catalog runs without an NVMe tier")
    here = host_id()
    if location.host_id != here:
        raise NotColocated(f"the catalog runs on {location.host_id!r}, this is {here!r}")
    if location.pid == os.getpid():
        raise NotColocated("the catalog runs in this process (LMDB forbids a second handle)")
    path = os.path.realpath(location.cache_dir)
    if not Path(path, "data.mdb").is_file():
        raise NotColocated(f"no NVMe tier environment at {path} from here")
    try:
        shared = SharedEnvironment.acquire(path)
    except (lmdb.Error, OSError) as exc:
        raise NotColocated(f"cannot open the NVMe tier at {path} read-only: {exc}") from None
    try:
        with shared.gate.shared(), shared.begin() as txn:
            instance = txn.get(INSTANCE_KEY, db=shared.info)
            found = None if instance is None else bytes(instance).decode(errors="replace")
    except lmdb.Error as exc:
        shared.release()
        raise NotColocated(f"cannot read the NVMe tier at {path}: {exc}") from None
    if found != location.instance_id:
        shared.release()
        raise NotColocated(
            f"the environment at {path} is {found!r}, not the catalog's {location.instance_id!r}"
        )
    return shared
