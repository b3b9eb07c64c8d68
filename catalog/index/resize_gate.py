"""The index's gate between its transactions and a resize of its LMDB map.

``mdb_env_set_mapsize`` may only run while the process has no transaction open. The pack cache
holds its transactions off a resize with a :class:`~catalog.locks.ReadWriteLock`; the index
cannot: its reads take microseconds and a lock on that path made writers convoy behind readers
(see :class:`ResizeGate`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from catalog.errors import FailedPrecondition

__all__ = ["ResizeGate"]


class ResizeGate:
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
        #: Set (under :meth:`exclusive`) once the environment is closed.
        self.closed = False

    def enter(self) -> None:
        """Register a transaction about to begin. Raises ``FailedPrecondition`` once closed."""
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
        """Unregister a transaction that has ended."""
        self._active.pop()
        if self._resizing and not self._active:
            self._drained.set()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold every transaction of this process off (waiting for open ones to end)."""
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
