"""Warm files in the push inbox (``catalog.local_push``): the catalog keeps a few files ready
whose pages already sit in the page cache, and a colocated client claims one and writes its
pack over them in place, so the push's own write allocates no new page cache.

Why (the 2-core dev VM, see docs/PERFORMANCE.md): this VM hands every free memory block of 128
KiB and more back to its host at once (``page_reporting``), and touching such memory again
costs a host fault per 4 KiB page. A push's inbox write of 17.6 MB into a new file allocates
that much new page cache: mostly 3-4 ms, but 40-60 ms in 3 of 20 writes (twice), and 16-60 ms
in the handoff bench's runs after its full path. Over a warm file the same write took 3.3-10.7
ms, median 3.6 (``bench/bench_inbox_write.py``: the two side by side); the allocation (~12 ms
for 18 MiB, more when the memory is cold) moves here, onto a background thread after the push.

How a warm file is made (:meth:`WarmFiles._make`): created as ``warm-<random>.tmp`` (a name no
client takes), ``posix_fallocate``'d to the capacity (unwritten extents: no disk IO) and read
once (:func:`_read_once`), which fills the page cache with clean zero pages
(``posix_fadvise(WILLNEED)`` was measured too: it cached only ~44% of an 18 MiB file, against
100% for the read), then renamed
to ``warm-<random>.pack`` and closed: the catalog holds no descriptor, so the lease the push
takes later finds no writer. Capacity: the largest of the last few pushes, rounded up to 1
MiB, at most ``WarmPolicy.max_bytes``; none before the first push, so a catalog that never
sees a colocated push keeps no files (or the largest leftover's size after a restart, below).

Races, and why each is harmless:

- **Two clients, one warm file.** A client claims by ``rename(warm-X.pack, push-Y.pack)``; the
  kernel lets exactly one rename of a name succeed, the other gets ``ENOENT`` and tries the
  next warm file or writes a new one as without warm files.
- **A refill while a client claims.** The catalog only ever creates ``.tmp`` names, renames
  them to ``warm-*.pack`` when ready, and unlinks ``warm-*.pack`` names it no longer wants
  (too small or too large for the capacity); it never opens a ``warm-*.pack`` again. Unlink
  and rename of one name are atomic against each other: the client either claimed the file
  (the unlink gets ``ENOENT``) or finds no file (its rename gets ``ENOENT``). A claimed file is
  a ``push-*`` name, which the catalog opens only when a push names it.
- **Two refills.** One worker thread per inbox runs them, one after another.
- **A crash mid-prepare.** A ``warm-*.tmp`` is left: removed when the inbox opens next.
  Ready ``warm-*.pack`` files left by the previous run are removed too (their pages may be
  long gone, e.g. after a reboot; a new file costs the same as re-reading one), and the
  largest one's size is the capacity the first refill uses, so pushes after a restart find
  warm files before the catalog saw a push.
- **A client that claims and dies.** Its ``push-*`` file is swept like any stale push file
  (:meth:`PushInbox.sweep`); the client's first write updated its mtime.
- **A client of another kind of file.** Only the catalog's user can create files in the
  ``0700`` inbox; still, the client opens a claimed file with ``O_NOFOLLOW`` and uses it only
  if it is a regular file of one link, and it overwrites every byte of its pack and truncates
  the rest: nothing of the file's previous content is pushed. The catalog's checks of a
  pushed file (one link, declared size, lease, hash, validation) are the same for both kinds.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: A ready warm file, which a client may claim.
WARM_NAME = re.compile(r"warm-[A-Za-z0-9_-]{8,64}\.pack")
#: A warm file being made: never claimed; a leftover one is what a crash left behind.
_PREPARING_NAME = re.compile(r"warm-[A-Za-z0-9_-]{8,64}\.tmp")
DEFAULT_FILES = 2
DEFAULT_MAX_BYTES = 256 << 20
#: Capacities are whole MiB: a push a little larger than the last still fits.
_ROUND_BYTES = 1 << 20
#: Pushes whose sizes the capacity is learned from (the largest of them).
_RECENT_PUSHES = 8
_READ_BYTES = 1 << 20
#: How long after the last push a refill waits (see :meth:`WarmFiles._wait_quiet`).
QUIET_S = 0.3
#: A warm file more than this many times the capacity is replaced: the push that claims it
#: would truncate the rest on its own clock.
_MAX_OVERSIZE = 2


def _read_once(fd: int, size: int) -> None:
    """Read the file ``fd`` once, which puts all its pages in the page cache: spliced to
    ``/dev/null`` (no copy to this process: 1.5 against 3.3 ms for 17 MiB here, both caching
    every page), or read into a small buffer where ``sendfile`` cannot."""
    offset = 0
    with contextlib.suppress(OSError):
        sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            while offset < size and (sent := os.sendfile(sink, fd, offset, size - offset)):
                offset += sent
        finally:
            os.close(sink)
    buffer = memoryview(bytearray(_READ_BYTES))
    while offset < size and (got := os.preadv(fd, [buffer], offset)):
        offset += got


@dataclass(frozen=True)
class WarmPolicy:
    """How many warm files the inbox keeps (0: none) and the largest capacity one may have.
    Raises ``ValueError`` for a negative count or a capacity below 1 byte."""

    files: int = DEFAULT_FILES
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.files < 0:
            raise ValueError(f"warm inbox files must be 0 or more, not {self.files}")
        if self.max_bytes < 1:
            raise ValueError(f"the warm inbox files' capacity must be positive: {self.max_bytes}")


OFF = WarmPolicy(files=0)


class WarmFiles:
    """Keeps ``policy.files`` warm files in the inbox directory ``dir_fd`` (see the module
    doc). :meth:`pushed` asks for a refill, which runs on a thread of its own, never the
    caller's."""

    def __init__(self, dir_fd: int, policy: WarmPolicy) -> None:
        self._dir_fd = dir_fd
        self.policy = policy
        self._recent: collections.deque[int] = collections.deque(maxlen=_RECENT_PUSHES)
        self._lock = threading.Lock()
        self._last_push = -float("inf")  # time.monotonic() of the last push
        self._quiet = threading.Condition(self._lock)
        self._wanted = False
        self._closed = False
        self._worker: threading.Thread | None = None
        #: Warm files made and removed, refill passes run, refills that failed (logs, tests).
        self.counters = {"made": 0, "removed": 0, "refills": 0, "errors": 0}
        leftover = self._remove_leftovers()
        if leftover and policy.files:
            self._recent.append(min(leftover, policy.max_bytes))
            self.refill()

    def capacity(self) -> int:
        """The capacity new warm files get: 0 while no push was seen (none are made)."""
        with self._lock:
            largest = max(self._recent, default=0)
        if not largest:
            return 0
        rounded = -(-largest // _ROUND_BYTES) * _ROUND_BYTES
        return min(rounded, self.policy.max_bytes)

    def pushed(self, size_bytes: int | None) -> None:
        """A push through the inbox ended (``size_bytes``: its size when it committed; None
        when it failed): learn the size and refill on the worker thread."""
        if not self.policy.files:
            return
        with self._lock:
            if size_bytes:
                self._recent.append(size_bytes)
            self._last_push = time.monotonic()
        self.refill()

    def refill(self) -> None:
        """Ask the worker thread for a refill pass (started when none runs)."""
        with self._lock:
            if self._closed or not self.policy.files:
                return
            self._wanted = True
            if self._worker is not None:
                return
            self._worker = threading.Thread(target=self._work, name="inbox-warm", daemon=True)
            self._worker.start()

    def close(self) -> None:
        """Stop refilling (a pass in progress ends after the file it makes); the warm files
        stay for the next run to replace."""
        with self._lock:
            self._closed = True
            self._quiet.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join()

    def _work(self) -> None:
        # Behind the catalog's other threads when the cores are busy: the refill is never
        # what a caller waits for (Linux: a thread's nice value is its own).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            with self._lock:
                if self._closed or not self._wanted:
                    self._worker = None
                    return
                self._wanted = False
            if not self._wait_quiet():
                continue
            try:
                self._refill_once()
            except Exception as exc:  # a full disk, a removed inbox: pushes write new files
                self.counters["errors"] += 1
                # once as a warning (a file system without fallocate would say it each push)
                level = logging.WARNING if self.counters["errors"] == 1 else logging.DEBUG
                log.log(level, "push inbox: cannot make warm files (%s)", exc, exc_info=True)

    def _wait_quiet(self) -> bool:
        """Wait until ``QUIET_S`` has passed since the last push; False when closed meanwhile.

        Why: a refill's first touch of new page cache is slow on this VM (host faults, 10-50
        ms for 17.6 MB) and it slowed the catalog's other calls while it ran, however low its
        thread's priority: a resolve right after a push took 4-29 ms with the refill started at
        once, 1.0-1.7 ms without warm files (2-core dev VM). Right after a push is when its
        engine attaches the new revision, so the refill waits for a quiet moment; a push that
        comes first (pushes < ``QUIET_S`` apart) claims the next warm file or writes a new one
        and pushes the refill back again."""
        with self._lock:
            while not self._closed:
                left = self._last_push + QUIET_S - time.monotonic()
                if left <= 0:
                    return True
                self._quiet.wait(left)
            return False

    def _refill_once(self) -> None:
        self.counters["refills"] += 1
        capacity = self.capacity()
        if not capacity:
            return
        ready = 0
        for name in self._names(WARM_NAME):
            try:
                found = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:  # claimed meanwhile
                continue
            fits = capacity <= found.st_size <= _MAX_OVERSIZE * capacity
            if fits and stat.S_ISREG(found.st_mode) and found.st_nlink == 1:
                ready += 1
            else:
                self._unlink(name)
        for _ in range(self.policy.files - ready):
            with self._lock:
                if self._closed:
                    return
            self._make(capacity)

    def _make(self, capacity: int) -> None:
        """One warm file of ``capacity`` bytes, cached, under a claimable name once ready."""
        token = secrets.token_urlsafe(12)
        preparing, ready = f"warm-{token}.tmp", f"warm-{token}.pack"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(preparing, flags, 0o600, dir_fd=self._dir_fd)
        try:
            os.posix_fallocate(fd, 0, capacity)
            _read_once(fd, capacity)
        except BaseException:
            os.close(fd)
            self._unlink(preparing)
            raise
        os.close(fd)
        os.rename(preparing, ready, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        self.counters["made"] += 1

    def _remove_leftovers(self) -> int:
        """Remove what a previous run left (see the module doc); the largest ready file's
        size (0: none)."""
        largest = 0
        for name in self._names(_PREPARING_NAME):
            self._unlink(name)
        for name in self._names(WARM_NAME):
            with contextlib.suppress(FileNotFoundError):
                found = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
                if stat.S_ISREG(found.st_mode):
                    largest = max(largest, found.st_size)
            self._unlink(name)
        return largest

    def _names(self, pattern: re.Pattern[str]) -> list[str]:
        return [name for name in os.listdir(self._dir_fd) if pattern.fullmatch(name)]

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._dir_fd)
            self.counters["removed"] += 1
