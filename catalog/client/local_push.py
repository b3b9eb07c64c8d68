"""The client's side of a colocated push (see ``catalog.local_push`` for the catalog's): on the
catalog's host, write the pack into the catalog's push inbox and name the file in one RPC,
instead of streaming it over gRPC (which caps a push at the Python stream's ~0.6 GB/s and
makes the catalog write a second copy).

The client decides once, on its first push: the catalog offers an inbox, on this host (same
host and boot id), that this process can create a file in. Otherwise (another host, another
user, a catalog without the RPC) every push streams. The bytes are not hashed here: the catalog
hashes the file itself, under a lease that keeps it unchanged (a stated digest would prove
nothing a local file could not also fake).

Warm files: when the catalog keeps ``warm-*.pack`` files ready in its inbox (their pages already
in the page cache, see ``catalog.warm_inbox``), a push claims one by renaming it to its own
``push-*`` name (one claimer wins) and writes the pack over it in place, so its write allocates
no new page cache; with none left it writes a new file as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.cache.layout import host_id
from catalog.pack import PackPlan
from catalog.pack.aligned_writes import aligned_windows
from catalog.warm_inbox import WARM_NAME

log = logging.getLogger(__name__)

#: What a client may write at once in the inbox without asking the disk: a failed write is a
#: fallback to the stream, never an error.
_WRITE_BYTES = 8 << 20
#: Bytes a pack is written in (see ``_write_into``), and the scratch that lora_B's
#: transposition goes through, one window at a time.
_PIECE_BYTES = 64 << 10
#: What a client writes into the inbox: pack bytes, a pack file, or a laid-out pack.
InboxSource = bytes | bytearray | memoryview | Path | PackPlan
_NO_INBOX = {
    grpc.StatusCode.UNIMPLEMENTED,  # an older catalog
    grpc.StatusCode.PERMISSION_DENIED,
}


class InboxPush:
    """Pushes through the catalog's inbox when this client can (decided on first use)."""

    def __init__(self, stub: Any, *, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout
        self._lock = threading.Lock()
        self._decided = False
        self._directory: Path | None = None
        #: Why pushes stream ("" while the inbox is used or not yet decided).
        self.reason = ""
        #: ``warm``: pushes written over a warm file the catalog had ready.
        self.counters = {"pushes": 0, "fallbacks": 0, "warm": 0}
        #: Seconds spent, summed over pushes: writing inbox files, and in ``PushFromInbox``
        #: (the catalog's hash, fsync, checks and commit), as ``ResidentEngine.timings``.
        self.timings = {"write_s": 0.0, "rpc_s": 0.0}

    def directory(self) -> Path | None:
        """The inbox this client writes into; ``None``: push over the stream."""
        with self._lock:
            if not self._decided:
                self._directory = self._find()
                self._decided = True
            return self._directory

    def push(
        self, source: InboxSource, header: pb.PushHeader, timeout: float
    ) -> pb.PushResponse | None:
        """Push ``source`` (pack bytes, a pack file, or a laid-out pack written here for the
        first time) as ``header`` says (no ``expected_digest`` needed) through the inbox;
        ``None`` when it cannot be written there (the caller streams it instead). Raises the
        RPC's error as ``grpc.RpcError``, as a streamed push would."""
        directory = self.directory()
        if directory is None:
            return None
        name = f"push-{secrets.token_urlsafe(18)}.pack"
        path = directory / name
        started = time.perf_counter()
        try:
            fd = _claim_warm(directory, path, _size_of(source))
            warm = fd is not None
            if fd is None:
                _write_new(path, source)
            else:
                _write_into(fd, source)
        except OSError as exc:  # a full disk, lost permissions: the stream still works
            with contextlib.suppress(OSError):
                path.unlink()
            self.counters["fallbacks"] += 1
            log.info("colocated push: cannot write %s (%s): streaming", path, exc)
            return None
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        written = time.perf_counter()
        try:
            response = self._stub.PushFromInbox(
                pb.PushFromInboxRequest(header=header, file_name=name), timeout=timeout
            )
        finally:
            with contextlib.suppress(OSError):  # the catalog unlinks it when it took it
                path.unlink()
        self.timings["write_s"] += written - started
        self.timings["rpc_s"] += time.perf_counter() - written
        self.counters["pushes"] += 1
        self.counters["warm"] += warm
        return response  # type: ignore[no-any-return]

    def _find(self) -> Path | None:
        try:
            inbox = self._stub.GetPushInbox(pb.PushInboxRequest(), timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() not in _NO_INBOX:
                raise
            self.reason = f"the catalog offers no push inbox ({exc.code().name})"
            return None
        if not inbox.directory:
            self.reason = "the catalog offers no push inbox"
        elif inbox.host_id != host_id():
            self.reason = "the catalog runs on another host"
        elif not os.access(inbox.directory, os.W_OK | os.X_OK):
            self.reason = f"cannot write the catalog's push inbox {inbox.directory}"
        else:
            return Path(inbox.directory)
        return None


def _size_of(source: InboxSource) -> int:
    """The bytes ``source`` will take in the inbox."""
    if isinstance(source, Path):
        return source.stat().st_size
    if isinstance(source, PackPlan):
        return source.nbytes
    return memoryview(source).nbytes


def _warm_candidates(directory: Path, size: int) -> list[str]:
    """The warm files in ``directory``, those that hold ``size`` bytes first (smallest
    first: the least to truncate), then the others (largest first: the least to allocate)."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if WARM_NAME.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    found.append((entry.stat(follow_symlinks=False).st_size, entry.name))
    fits = sorted(item for item in found if item[0] >= size)
    short = sorted((item for item in found if item[0] < size), reverse=True)
    return [name for _, name in fits + short]


def _claim_warm(directory: Path, path: Path, size: int) -> int | None:
    """Claim a warm file as ``path`` (a ``push-*`` name of this client) and open it for
    writing; its descriptor, or ``None`` when there is none to claim. ``rename`` is the claim:
    of clients racing for one file exactly one succeeds, the others get ``ENOENT`` and try
    the next. A claimed file that is not a plain file of one link is removed and skipped.
    Raises ``OSError`` when a claimed file cannot be opened."""
    for name in _warm_candidates(directory, size):
        try:
            os.rename(directory / name, path)
        except FileNotFoundError:  # another client's, or the catalog replaced it
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # ELOOP: a symlink was named like a warm file
            path.unlink()
            continue
        found = os.fstat(fd)
        if stat.S_ISREG(found.st_mode) and found.st_nlink == 1:
            return fd
        os.close(fd)
        path.unlink()
    return None


def _write_new(path: Path, source: InboxSource) -> None:
    """Write ``source`` into the new file ``path`` (private to this user), as
    :func:`_write_into`."""
    _write_into(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), source)


def _write_into(fd: int, source: InboxSource) -> None:
    """Write ``source`` into the inbox file ``fd`` from its start, truncate it to exactly
    that, and close ``fd`` (the catalog's lease needs the file open for writing nowhere).
    The file is new, or a warm file whose old bytes are all overwritten or cut off (cutting
    a warm file's rest off took 0.5 ms for 17 of 18 MiB, 1.5 ms for 255 of 256 MiB here).

    The file's blocks are allocated first (``posix_fallocate``: a full disk is an ``OSError``
    here, and the caller streams instead; over a warm file's capacity this is only its
    tail), then the bytes are written with ``pwrite`` in pieces of 64 KiB. Why pieces, on
    the 2-core dev VM (17.6 MB, new files kept, as the store keeps them; see
    docs/PERFORMANCE.md, fifth pass): one large ``write`` took 4.6-48 ms (median 20): the
    page cache then takes large folios, and this VM hands freed memory in blocks of 128 KiB
    and more back to its host, so such blocks are slow to touch again; the same copy through
    a shared mapping took 11-23 ms (median 12.4: a page fault per 4 KiB); in 64 KiB pieces
    3.2-9.9 ms (median 4.0), and its fsync was faster too (8.4 against 10.7 ms). The pieces
    are windows at offsets that are multiples of 64 KiB (``os.pwritev``, whole pages each
    time; a pack's 4 KiB header had put every later piece across page boundaries: a new
    17.6 MB file 8.1-8.7 -> 5.5-5.9 ms). A :class:`PackPlan` is written window by window
    (:func:`catalog.pack.aligned_writes.aligned_windows`), ``lora_B`` transposed into a small
    scratch buffer as each window needs it: no pack in memory first. (Starting writeback
    every 2 MiB with ``sync_file_range`` halved the catalog's fsync but made the write ~3.5
    ms longer and the push RPC no shorter: its sha256 is the longer step; not kept.)"""
    with os.fdopen(fd, "wb") as f:  # an open descriptor: "w" truncates nothing
        if isinstance(source, Path):
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, _WRITE_BYTES)
            f.flush()
            os.ftruncate(fd, f.tell())
            return
        if isinstance(source, PackPlan):
            size = source.nbytes
            scratch = memoryview(bytearray(_PIECE_BYTES))
            windows: Iterable[tuple[int, list[memoryview]]] = aligned_windows(
                source, scratch, _PIECE_BYTES
            )
        else:
            view = memoryview(source).cast("B")
            size = view.nbytes
            windows = (
                (start, [view[start : start + _PIECE_BYTES]])
                for start in range(0, size, _PIECE_BYTES)
            )
        if size:
            os.posix_fallocate(fd, 0, size)
        written = 0
        for offset, buffers in windows:
            written = offset + _pwritev_all(fd, buffers, offset)
        if written != size:  # a plan's parts and its size disagree: never pushed
            raise ValueError(f"wrote {written} bytes of a {size}-byte pack")
        os.ftruncate(fd, size)


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    """``pwritev`` all of ``buffers`` at ``offset`` (a short write continues); their length."""
    total = sum(b.nbytes for b in buffers)
    done = os.pwritev(fd, buffers, offset)
    while done < total:  # rare: a signal, a full page cache; finish piece by piece
        skip = done
        rest = []
        for b in buffers:
            if skip >= b.nbytes:
                skip -= b.nbytes
                continue
            rest.append(b[skip:])
            skip = 0
        done += os.pwritev(fd, rest, offset + done)
    return total
