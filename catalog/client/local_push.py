"""The client's side of a colocated push (see ``catalog.local_push`` for the catalog's): on the
catalog's host, write the pack into the catalog's push inbox and name the file in one RPC,
instead of streaming it over gRPC (which caps a push at the Python stream's ~0.6 GB/s and
makes the catalog write a second copy).

The client decides once, on its first push: the catalog offers an inbox, on this host (same
host and boot id), that this process can create a file in. Otherwise (another host, another
user, a catalog without the RPC) every push streams. The bytes are not hashed here: the catalog
hashes the file itself, under a lease that keeps it unchanged (a stated digest would prove
nothing a local file could not also fake).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.cache.layout import host_id
from catalog.pack import PackPlan

log = logging.getLogger(__name__)

#: What a client may write at once in the inbox without asking the disk: a failed write is a
#: fallback to the stream, never an error.
_WRITE_BYTES = 8 << 20
#: Bytes a pack is written in (see ``_write_new``), and the scratch that lora_B's
#: transposition goes through (at least one matrix of it).
_PIECE_BYTES = 64 << 10
_SCRATCH_BYTES = 1 << 20
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
        self.counters = {"pushes": 0, "fallbacks": 0}
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
            _write_new(path, source)
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


def _write_new(path: Path, source: InboxSource) -> None:
    """Write ``source`` into the new file ``path`` (private; closed before the RPC: the
    catalog's lease needs the file open for writing nowhere).

    The file's blocks are allocated first (``posix_fallocate``: a full disk is an ``OSError``
    here, and the caller streams instead), then the bytes are written with ``pwrite`` in
    pieces of 64 KiB. Why pieces, on the 2-core dev VM (17.6 MB, new files kept, as the store
    keeps them; see docs/PERFORMANCE.md, fifth pass): one large ``write`` took 4.6-48 ms
    (median 20): the page cache then takes large folios, and this VM hands freed memory in
    blocks of 128 KiB and more back to its host, so such blocks are slow to touch again; the
    same copy through a shared mapping took 11-23 ms (median 12.4: a page fault per 4 KiB);
    in 64 KiB pieces 3.2-9.9 ms (median 4.0), and its fsync was faster too (8.4 against 10.7
    ms). A :class:`PackPlan` is written part by part, ``lora_B`` transposed a few matrices
    at a time through a small scratch buffer: no pack in memory first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+b") as f:
        if isinstance(source, Path):
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, _WRITE_BYTES)
            return
        if isinstance(source, PackPlan):
            size = source.nbytes
            scratch = memoryview(bytearray(max(_SCRATCH_BYTES, source.scratch_nbytes)))
            pieces: Iterable[memoryview] = source.pieces(scratch)
        else:
            view = memoryview(source).cast("B")
            size, pieces = view.nbytes, [view]
        if not size:
            return
        os.posix_fallocate(fd, 0, size)
        offset = 0
        for piece in pieces:
            for start in range(0, piece.nbytes, _PIECE_BYTES):
                offset += _pwrite_all(fd, piece[start : start + _PIECE_BYTES], offset)
        if offset != size:  # a plan's parts and its size disagree: never pushed
            raise ValueError(f"wrote {offset} bytes of a {size}-byte pack")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    """``pwrite`` all of ``data`` at ``offset`` (a short write continues); its length."""
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)
    return done
