"""Writing a local file so that readers see its old contents or its whole new contents, never a
part: the one temporary-name-and-rename write the package shares.

The job: create a temporary file beside the target (same directory, so the rename stays on one
filesystem), write into it, optionally fsync it, rename it over the target, optionally fsync
the directory so the rename itself survives a power loss. Whatever fails on the way, the
temporary file is removed and the target is left as it was.

Durability is each caller's choice and is therefore never defaulted: ``fsync`` is a required
keyword. What it buys: without it a crash of the *process* still cannot expose a torn file
(the rename is atomic and the bytes are in the page cache), but a crash of the *machine* may
leave the target empty or old after the rename reached the disk before the data did. A
SIGKILL between creating the temporary file and the rename leaves a ``.<name>.<random>.tmp``
file beside the target; nothing removes it later.

Not for writes that are different on purpose (see their modules): ``LocalDirStore``'s objects
(reserved temporary names its listings skip, and ``if_absent`` publishes by hard link, which
fails when the name exists), the warm inbox's files (a directory descriptor and
``O_NOFOLLOW``), a push's spool file (consumed, never renamed over a target), the durable log
(an object store's conditional put), and whole-directory swaps (``loracat pull``, reindex).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, TextIO, overload

#: What ``write_atomically`` takes: text (written as UTF-8), bytes, or chunks written in order.
Data = str | bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]

_TEMP_SUFFIX = ".tmp"


@overload
def open_atomically(
    path: str | os.PathLike[str],
    *,
    fsync: bool,
    fsync_dir: bool = False,
    mode: int | None = None,
    text: Literal[False] = False,
) -> AbstractContextManager[BinaryIO]: ...


@overload
def open_atomically(
    path: str | os.PathLike[str],
    *,
    fsync: bool,
    fsync_dir: bool = False,
    mode: int | None = None,
    text: Literal[True],
) -> AbstractContextManager[TextIO]: ...


def open_atomically(
    path: str | os.PathLike[str],
    *,
    fsync: bool,
    fsync_dir: bool = False,
    mode: int | None = None,
    text: bool = False,
) -> AbstractContextManager[IO[Any]]:
    """A file to write ``path``'s new contents into; they replace ``path`` when the ``with``
    block ends normally, and are thrown away (``path`` untouched, no temporary file left) when
    it raises.

    Args:
        path: the file to replace (or create). Its directory must exist.
        fsync: fsync the file before the rename (the contents survive a power loss once the
            rename does).
        fsync_dir: fsync ``path``'s directory after the rename (the rename survives a power
            loss). Pair it with ``fsync``: a durable rename of contents that are not could
            leave an empty file after a power loss.
        mode: the file's permission bits; ``None`` gives what ``open(path, "w")`` would
            (``0o666`` less the umask and any default ACL of the directory).
        text: yield a UTF-8 text file instead of a binary one.

    Raises:
        OSError: the temporary file cannot be created, written, fsynced or renamed (the
            target is untouched), or the directory's fsync failed (the target already holds
            the new contents). Whatever the ``with`` block raises, after the cleanup.
    """
    return _replacement(Path(path), fsync=fsync, fsync_dir=fsync_dir, mode=mode, text=text)


@contextmanager
def _replacement(
    target: Path, *, fsync: bool, fsync_dir: bool, mode: int | None, text: bool
) -> Iterator[IO[Any]]:
    """:func:`open_atomically`'s work (the overloads type its file by ``text``)."""
    fd, temporary = _create_temporary(target)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        handle: IO[Any] = os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    try:
        with handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if fsync_dir:
        fsync_directory(target.parent)


def write_atomically(
    path: str | os.PathLike[str],
    data: Data,
    *,
    fsync: bool,
    fsync_dir: bool = False,
    mode: int | None = None,
) -> None:
    """Replace ``path``'s contents with ``data`` (text is written as UTF-8; a sequence of chunks
    is written in order), never leaving it part-written; see :func:`open_atomically` for
    ``fsync``, ``fsync_dir`` and ``mode``.

    Raises:
        OSError: as :func:`open_atomically` (the temporary file is removed).
    """
    with open_atomically(path, fsync=fsync, fsync_dir=fsync_dir, mode=mode) as handle:
        if isinstance(data, str):
            handle.write(data.encode("utf-8"))
        elif isinstance(data, bytes | bytearray | memoryview):
            handle.write(data)
        else:
            handle.writelines(data)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename, link or new name in ``directory`` durable (POSIX needs the directory
    itself fsynced for that).

    Raises:
        OSError: ``directory`` cannot be opened or fsynced.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(target: Path) -> tuple[int, str]:
    """A new file beside ``target``, opened for writing: its descriptor and name. Created
    with ``0o666`` so the kernel applies the umask (and a default ACL) as for a plain
    ``open``; ``O_EXCL`` so two writers never share one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    while True:
        name = os.path.join(target.parent, f".{target.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue  # 48 random bits met an existing name: draw again
