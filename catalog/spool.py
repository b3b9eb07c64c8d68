"""The push spool: local files holding pushes in flight, swept at start and bounded while
running.

A push is spooled to ``ROOT/spool/push-*.pack`` while it streams in (it is hashed and validated
before anything durable is written). A crash leaves those files behind, and nothing else ever
reads them, so :class:`PushSpool` deletes them when the catalog opens: only when it gets the
spool's lock (``spool.lock`` beside it, held until close), so a second catalog opened on a root
that a running server owns never deletes that server's pushes in flight. While running, every push
reserves its declared size first; a push that would take the spool past its byte budget, or past
the free space on its disk, is refused with ``ResourceExhausted`` before a byte is written.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import threading
from pathlib import Path
from typing import IO

from catalog.errors import ResourceExhausted

log = logging.getLogger(__name__)
SPOOL_PATTERN = "push-*.pack"
#: Free space a push must leave on the spool's disk (the index and cache may share it).
MIN_FREE_BYTES = 256 << 20


class SpoolReservation:
    """Bytes of the spool held by one push; ``release`` (idempotent) gives them back."""

    def __init__(self, spool: PushSpool, nbytes: int) -> None:
        self._spool = spool
        self.nbytes = nbytes
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._spool._give_back(self.nbytes)


class PushSpool:
    """The spool directory and its byte budget (``max_bytes`` over all pushes in flight)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._held = 0
        self._lock = threading.Lock()
        # beside the directory, not in it: the spool holds push files only
        lock_path = self.directory.with_name(self.directory.name + ".lock")
        self._owner: IO[bytes] | None = open(lock_path, "a+b")  # noqa: SIM115
        try:
            fcntl.flock(self._owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another catalog serves this root: its files are not ours
            self._owner.close()
            self._owner = None

    def sweep(self) -> tuple[int, int]:
        """Delete the files pushes left behind, if this spool holds the directory's lock (call
        before serving); returns (files, bytes) deleted."""
        files = nbytes = 0
        if self._owner is None:
            log.info("push spool %s is in use by another catalog: not swept", self.directory)
            return files, nbytes
        for path in self.directory.glob(SPOOL_PATTERN):
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            files += 1
            nbytes += size
        if files:
            log.warning("swept %d push spool files (%d bytes) left by a crash", files, nbytes)
        return files, nbytes

    @property
    def held_bytes(self) -> int:
        return self._held

    def reserve(self, what: str, nbytes: int) -> SpoolReservation:
        """Hold ``nbytes`` for a push. Raises ``ResourceExhausted`` when the spool's budget or
        its disk's free space (less ``MIN_FREE_BYTES``) cannot take them."""
        with self._lock:
            if self._held + nbytes > self.max_bytes:
                raise ResourceExhausted(
                    f"{what}: the push spool holds {self._held} bytes of pushes in flight; "
                    f"{nbytes} more would pass its {self.max_bytes}-byte limit; retry later"
                )
            # as if pushes in flight had written nothing yet: conservative by what they wrote
            free = shutil.disk_usage(self.directory).free - self._held
            if nbytes > free - MIN_FREE_BYTES:
                raise ResourceExhausted(
                    f"{what}: {nbytes} bytes do not fit on the spool's disk "
                    f"({max(free, 0)} bytes free for pushes)"
                )
            self._held += nbytes
        return SpoolReservation(self, nbytes)

    def close(self) -> None:
        """Let go of the spool's lock (the next catalog on this root sweeps it)."""
        if self._owner is not None:
            self._owner.close()
            self._owner = None

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes
