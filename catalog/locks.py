"""Small locking primitives the catalog core needs and the standard library lacks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WouldBlock(Exception):
    """Raised instead of waiting, on a thread that must never wait for a lock (see
    :func:`never_wait_here`): the caller moves its work to a thread that may."""


_never_wait = threading.local()


def never_wait_here() -> None:
    """Mark the calling thread (an event loop) as one that must not block on a
    :class:`ReadWriteLock`: where it would wait, ``acquire_shared`` raises :class:`WouldBlock`."""
    _never_wait.on = True


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so it is not starved.

    The core takes it shared for every operation and exclusively only to swap the index
    (online reindex), so the common path costs two uncontended mutex operations.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._shared = _SharedHold(self)

    def shared(self) -> _SharedHold:
        """``with lock.shared(): ...`` holds the lock shared (not re-entrant: a waiting writer
        blocks new readers)."""
        # A plain object with __enter__/__exit__, made once: every catalog read takes this, and a
        # generator-based context manager costs a few microseconds more per call.
        return self._shared

    def acquire_shared(self) -> None:
        with self._cond:
            if (self._writer or self._writers_waiting) and getattr(_never_wait, "on", False):
                raise WouldBlock("a writer holds or waits for the lock")
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            # only writers wait for the readers to drain
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _SharedHold:
    __slots__ = ("_lock",)

    def __init__(self, lock: ReadWriteLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_shared()

    def __exit__(self, *exc: object) -> None:
        self._lock.release_shared()


class KeyedLocks:
    """One mutex per key (an adapter name), created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[object, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: object) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)
