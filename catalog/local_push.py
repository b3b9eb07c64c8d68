"""Colocated pushes: a client on the catalog's host writes the pack into the catalog's push
inbox and names the file in one RPC (``PushFromInbox``); no byte stream, no second write.

Why this is safe (the client must not make the catalog ingest an arbitrary path, nor bytes
that change after they were hashed):

- **Only names in the inbox.** The request carries a file name matching ``push-*.pack``, never
  a path; it is opened relative to the inbox directory's descriptor with ``O_NOFOLLOW``, and
  must be a regular file with one link, of exactly the declared size. The inbox (``ROOT/inbox``)
  is made ``0700``: only the catalog's own user can put files there (other users' clients
  cannot create the file and push over the stream). Whoever may call the RPC is decided as for
  ``Push`` (``write`` on the header's tenant).
- **Bytes that cannot change while they are taken.** The catalog takes a read lease on the
  file (``F_SETLEASE``). The kernel grants it only when no one has the file open for writing
  (a writable shared mapping counts), and while it is held any ``open`` for writing blocks
  until the catalog lets go (or the kernel's ``lease-break-time``, 45 s by default, passes).
  So the bytes hashed are the bytes linked into the store: the catalog hashes them (sha256 for
  the digest, the pack's checks, later the tier's XXH3 chunk checksums), checks that no one
  asked to open the file for writing meanwhile (a pending break refuses the push, nothing
  committed), commits, hard-links the file into a ``file://`` store on its filesystem (as
  ``BlobStore.put_file(consume=True)`` does with the stream's spool file), unlinks the inbox
  name and only then lets go of the lease. A break notice goes to ``SIGURG``, ignored by
  default, not to ``SIGIO``, which would end the process.
- **Otherwise a copy.** When the lease is refused (another writer holds the file open, a file
  system without leases, a file owned by another user), the catalog copies the file into its
  own spool file while hashing the copy, exactly as the stream's bytes are spooled: a writer
  changing the file meanwhile changes nothing the catalog hashed.

What a linked file does not guard against: a process of the catalog's own user that opens the
store's file later can write it, as it can any file of a ``file://`` store; the NVMe tier's
chunk checksums then find the change (corruption, not forgery; see ``catalog.cache.layout``).

Warm files: the catalog keeps a few ``warm-*.pack`` files in the inbox whose pages are already
in the page cache; a client claims one by renaming it to its ``push-*`` name and writes its pack
over it (``catalog.warm_inbox`` says why, and why the races are harmless). Nothing above
changes for such a file: it is a ``push-*`` file like any other when the push names it.

Cost (16.8 MB, this 2-core VM): the data's fsync and sha256 run on threads of their own while
the caller validates the pack (:class:`HashAndSync`; all on the page cache's pages, no copy),
then the log event's small fsync.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.cache.layout import chunk_checksums
from catalog.digest import Digest, new_hasher
from catalog.errors import Conflict, InvalidArgument, NotFound
from catalog.model import AdapterName, Revision
from catalog.warm_inbox import OFF, WarmFiles, WarmPolicy

if TYPE_CHECKING:
    from catalog.core import Catalog
    from catalog.push_upload import PushUpload

log = logging.getLogger(__name__)

#: A file a client may name: made by ``catalog.client.local_push`` with a random part.
INBOX_NAME = re.compile(r"push-[A-Za-z0-9_-]{8,64}\.pack")
#: Files older than this are what a client that died left behind; swept when the inbox opens.
STALE_S = 600.0
_COPY_BYTES = 1 << 20
# fcntl's lease commands (Linux); Python names F_SETLEASE and F_GETLEASE but not F_SETSIG.
_F_SETSIG = 10
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)


class PushInbox:
    """The directory colocated clients write pushes into (``0700``, the catalog's user), with
    the warm files ``warm`` asks for (``catalog.warm_inbox``; default none). Raises
    ``OSError`` when the directory cannot be made or opened."""

    def __init__(self, directory: Path, warm: WarmPolicy = OFF) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        self._lock = threading.Lock()
        #: The warm files clients claim; ``warm.pushed(size)`` after each push refills them.
        self.warm = WarmFiles(self._fd, warm)

    def sweep(self, older_than_s: float = STALE_S) -> int:
        """Delete inbox files older than ``older_than_s`` (their clients died); how many."""
        deadline, gone = time.time() - older_than_s, 0
        for path in self.directory.glob("push-*.pack"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < deadline:
                    path.unlink()
                    gone += 1
        return gone

    def take(self, file_name: str, size_bytes: int, what: str) -> InboxFile:
        """Open the inbox file ``file_name`` for a push of ``size_bytes``, leased when the
        kernel allows (see the module doc). Raises ``InvalidArgument`` for a name that is not
        an inbox name, a file that is not a plain file of one link, or of another size;
        ``NotFound`` when there is no such file."""
        if not INBOX_NAME.fullmatch(file_name):
            raise InvalidArgument(f"{what}: {file_name[:80]!r} is not a push inbox file name")
        try:
            fd = os.open(file_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd)
        except FileNotFoundError:
            raise NotFound(f"{what}: no file {file_name!r} in the push inbox") from None
        except OSError as exc:  # ELOOP: a symlink
            raise InvalidArgument(f"{what}: cannot open inbox file {file_name!r}: {exc}") from exc
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
                raise InvalidArgument(
                    f"{what}: inbox file {file_name!r} must be a plain file of one link"
                )
            if found.st_size != size_bytes:
                raise InvalidArgument(
                    f"{what}: inbox file {file_name!r} holds {found.st_size} bytes, "
                    f"{size_bytes} were declared"
                )
            leased = found.st_uid == os.geteuid() and _lease(fd)
        except BaseException:
            os.close(fd)
            raise
        return InboxFile(self, file_name, fd, leased)

    def _unlink(self, file_name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file_name, dir_fd=self._fd)

    def close(self) -> None:
        self.warm.close()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``) is on
    this host: only such callers are told where the inbox is (the path names the catalog's
    root, which ``Stats`` hides from non-admins; a remote caller could not write there)."""
    kind, _, address = peer.partition(":")
    if kind == "unix":
        return True
    host = address.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    return host == "::1" or host.startswith("127.") or host == "::ffff:127.0.0.1"


def _lease(fd: int) -> bool:
    """Take a read lease on ``fd``; whether the kernel granted it."""
    try:
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)  # a break notice must not end the process
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:  # EAGAIN: open for writing somewhere; EACCES, EINVAL: no leases
        log.debug("push inbox: no read lease (%s): the file is copied", exc)
        return False
    return True


@dataclass
class InboxFile:
    """An open inbox file, leased or not; :meth:`close` lets go and unlinks its name."""

    inbox: PushInbox
    name: str
    fd: int
    leased: bool

    @property
    def path(self) -> Path:
        """The open file itself (a link to the inode this process holds, not to the name)."""
        return Path(f"/proc/self/fd/{self.fd}")

    def check_unbroken(self, what: str) -> None:
        """Raise ``Conflict`` (ABORTED) when someone asked to open the file for writing since
        the lease was taken (the kernel then reports the lease as breaking)."""
        if self.leased and fcntl.fcntl(self.fd, _F_GETLEASE) != fcntl.F_RDLCK:
            raise Conflict(
                f"{what}: the inbox file was opened for writing while the catalog took it; "
                "nothing was committed"
            )

    def close(self) -> None:
        self.inbox._unlink(self.name)  # before the lease ends: no new opener finds the name
        if self.leased:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, _F_SETLEASE, fcntl.F_UNLCK)
        os.close(self.fd)


#: The threads that hash and sync inbox files: kept between pushes, because starting two
#: threads per push took 1.3-2.3 ms on the 2-core dev VM (each ``start`` waits until its
#: thread runs), and the sha256 cannot begin before its thread does. Two pushes at once
#: each get their pair; a third queues behind them.
_WORKERS = 4
_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()


def _inbox_workers() -> ThreadPoolExecutor:
    global _workers
    with _workers_lock:
        if _workers is None:
            _workers = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="inbox-hash")
        return _workers


class HashAndSync:
    """The digest of the file ``fd`` and its fsync, each on a thread of its own (kept between
    pushes, see ``_WORKERS``), so that both run beside the caller's own pass over the file
    (the pack's validation, then :meth:`take_checksums`): sha256 (~8-10 ms for 16.8 MB
    here), the numpy bit test, the XXH3 checksums and the data's fsync (~7-9 ms) all let go
    of the GIL. :meth:`digest` waits for both."""

    def __init__(self, fd: int, algorithm: str, chunk_bytes: int | None = None) -> None:
        self._fd, self._algorithm, self._chunk_bytes = fd, algorithm, chunk_bytes
        self._digest: Digest | None = None
        #: With ``chunk_bytes``: it and the NVMe tier's checksums of each chunk, once
        #: :meth:`take_checksums` took them.
        self.checksums: tuple[int, bytes] | None = None
        self._errors: list[BaseException] = []
        workers = _inbox_workers()
        # the hash first: it is the longer step, and a free worker takes it at once
        self._jobs = [workers.submit(self._run, job) for job in (self._hash, self._sync)]

    def wait(self) -> None:
        """Until both steps ended (whatever they did)."""
        futures_wait(self._jobs)

    def digest(self) -> Digest:
        """The file's digest, once it is hashed and synced; raises what either step raised."""
        self.wait()
        if self._errors:
            raise self._errors[0]
        assert self._digest is not None
        return self._digest

    def _run(self, job: Any) -> None:
        try:
            job()
        except BaseException as exc:
            self._errors.append(exc)

    def _sync(self) -> None:
        os.fsync(self._fd)

    def take_checksums(self) -> None:
        """Take the NVMe tier's checksum of each chunk (with ``chunk_bytes``; else nothing)
        on the calling thread, while the hashing thread still runs: sha256 is the longest
        step, and the checksums on its thread had made it ~1.5 ms longer (13.0 against ~11
        ms, 2-core dev VM). Raises ``OSError`` when the file cannot be mapped."""
        if not self._chunk_bytes:
            return
        size = self._chunk_bytes
        with (
            mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as mm,
            memoryview(mm) as view,
        ):
            self.checksums = (size, chunk_checksums(view, size))

    def _hash(self) -> None:
        with (
            mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as mm,
            memoryview(mm) as view,
        ):
            hasher = new_hasher(self._algorithm)
            hasher.update(view)
        self._digest = Digest(self._algorithm, hasher.hexdigest())


def push_from_inbox(
    catalog: Catalog,
    inbox: PushInbox,
    file_name: str,
    adapter: AdapterName,
    *,
    size_bytes: int,
    time_left: Any = None,
    **options: Any,
) -> tuple[Revision, bool]:
    """Commit the inbox file ``file_name`` as a push of ``adapter`` (``options`` as
    ``Catalog.open_push``); see the module doc. The inbox file is gone afterwards, committed
    or not. Raises what ``Catalog.open_push`` and ``PushUpload.commit`` raise, plus
    ``InvalidArgument``/``NotFound`` (see :meth:`PushInbox.take`) and ``Conflict`` (the file
    was opened for writing meanwhile)."""
    what = f"push of {adapter}"
    if size_bytes <= 0:
        raise InvalidArgument(f"{what}: size_bytes must be positive")
    taken = inbox.take(file_name, size_bytes, what)
    try:
        with catalog.open_push(adapter, size_bytes=size_bytes, **options) as upload:
            upload.time_left = time_left
            if not taken.leased:
                _copy_into(upload, taken.fd)
                return upload.commit()
            cache = catalog.pack_cache
            pending = HashAndSync(
                taken.fd, catalog.digest_algorithm, cache.chunk_bytes if cache else None
            )

            def digest_of() -> Digest:
                pending.take_checksums()  # beside the hashing thread, after the validation
                digest = pending.digest()
                upload.tier_checksums = pending.checksums
                return digest

            try:
                return upload.commit_file(
                    taken.path, digest_of, before_commit=lambda: taken.check_unbroken(what)
                )
            finally:
                pending.wait()  # nothing may still read the file when it is closed
    finally:
        taken.close()


def _copy_into(upload: PushUpload, fd: int) -> None:
    """Spool the file ``fd`` through ``upload`` (hashing the copy, not the file)."""
    with os.fdopen(os.dup(fd), "rb") as source:
        while block := source.read(_COPY_BYTES):
            upload.write(block)
