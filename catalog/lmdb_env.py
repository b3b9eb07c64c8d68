"""What the catalog's two LMDB environments, the index's and the pack cache's, do alike.

:class:`catalog.index.environment.IndexEnvironment` and
:class:`catalog.cache.environment.CacheEnvironment` differ on purpose in how they open the
environment and hold transactions off a resize (see their docstrings); the schema check, map
growth and ending a failed write transaction are the same logic, kept here once.
"""

from __future__ import annotations

from typing import Any

import lmdb

from catalog.errors import FailedPrecondition, Internal, ResourceExhausted

__all__ = ["check_schema", "end_failed_write", "grow_map"]


def check_schema(
    txn: lmdb.Transaction[Any], db: Any, key: bytes, version: int, what: str, remedy: str
) -> None:
    """Record ``version`` under ``key`` in a new environment (inside write ``txn``), or check
    an existing one's.

    Raises ``FailedPrecondition`` naming ``what`` and ``remedy`` for another version.
    """
    found = txn.get(key, db=db)
    if found is None:
        txn.put(key, str(version).encode(), db=db)
    elif bytes(found) != str(version).encode():
        raise FailedPrecondition(
            f"{what} has schema {bytes(found).decode(errors='replace')!r}, this version reads"
            f" {version}: {remedy}"
        )


def grow_map(env: lmdb.Environment, max_map_size: int, what: str) -> None:
    """Double ``env``'s map, up to ``max_map_size``.

    The caller holds every transaction of this process off meanwhile, as
    ``mdb_env_set_mapsize`` requires. Raises ``ResourceExhausted`` naming ``what`` when the map
    is already at ``max_map_size``.
    """
    current = int(env.info()["map_size"])
    if current >= max_map_size:
        raise ResourceExhausted(f"{what} is full at its {current}-byte LMDB map (max_map_size)")
    env.set_mapsize(min(current * 2, max_map_size))


def end_failed_write(txn: lmdb.Transaction[Any], what: str) -> None:
    """End a write transaction that LMDB has marked failed (a full map), without ``abort()``.

    ``Transaction.abort()`` of a write transaction in py-lmdb 3.0 stalls while other threads of
    the process run read transactions back to back: 1.7-3.8 s per abort beside two such reader
    threads and more than 30 s beside three, on the 2-core dev machine, where a commit takes
    microseconds. LMDB refuses to commit a failed transaction (``MDB_BAD_TXN``) and aborts it
    itself, without that stall, so a commit ends it.

    Raises ``Internal`` naming ``what`` if LMDB committed it after all (it was not failed).
    """
    try:
        txn.commit()
    except lmdb.BadTxnError:
        return
    raise Internal(f"LMDB committed a transaction that had failed; {what} may be inconsistent")
