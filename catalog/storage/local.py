"""``file://``: a store in a local directory, one file per object.

Plain ``os`` calls rather than fsspec's local file system: every write needs a temporary name,
``fsync`` and an atomic publish step that fsspec does not expose, and reads are a single
``read`` of the file either way. Nor :func:`catalog.atomic_files.open_atomically`: a store's
temporary names carry the reserved ``TEMP_PREFIX`` (listings skip them, keys cannot take
them), and ``if_absent`` publishes by hard link, which fails when the name exists, where that
helper would replace it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from catalog.atomic_files import fsync_directory
from catalog.errors import InvalidArgument, Unavailable
from catalog.storage.base import BlobStore
from catalog.storage.keys import check_key, check_prefix, check_range

#: Temporary files start with this; they live beside their final name and are never listed.
TEMP_PREFIX = ".loracat-tmp-"

_COPY_CHUNK = 16 << 20
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class LocalDirStore(BlobStore):
    """Objects as files under ``root``; ``a/b/c`` is the file ``root/a/b/c``.

    Every write goes to a temporary file in the target's directory, is fsynced, and is then
    published by ``os.replace`` (overwrite) or ``os.link`` (``if_absent``: the link fails if the
    name exists, which makes the check and the write one atomic step across threads and
    processes). Readers therefore see either the old object or the whole new one.

    A key cannot be both an object and the parent of other keys here (``a`` and ``a/b``), as it
    can on S3; the catalog's layout never needs that, and a write that would need it raises
    ``InvalidArgument``.
    """

    supports_conditional_put = True
    supports_ranges = True

    def __init__(self, root: Path | str, *, create: bool = True, fsync: bool = True) -> None:
        """Open the store rooted at ``root``.

        Args:
            root: the directory holding the objects.
            create: create ``root`` (and its parents) if it does not exist.
            fsync: fsync each object and its directory before a write returns. Turning it off
                trades durability across power loss for speed (tests, scratch stores).

        Raises:
            Unavailable: ``root`` does not exist (and ``create`` is false), is not a directory,
                or cannot be created.
        """
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()
        self._fsync = fsync
        if self.root.exists() and not self.root.is_dir():
            raise Unavailable(f"local store {self.url}: {self.root} is not a directory")
        try:
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
            elif not self.root.is_dir():
                raise Unavailable(f"local store {self.url}: {self.root} does not exist")
        except OSError as exc:
            raise Unavailable(f"local store {self.url}: cannot create {self.root}: {exc}") from exc

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except _MISSING:
            return None
        except OSError as exc:
            raise self._unavailable("read", key, exc) from exc

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        path = self._path(key)
        check_range(key, start, length)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except _MISSING:
            return None
        except OSError as exc:
            raise self._unavailable("read a range of", key, exc) from exc

    def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            st = os.stat(path)
        except _MISSING:
            return None
        except OSError as exc:
            raise self._unavailable("stat", key, exc) from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        # Only the directory that can hold matches is walked: "log/t/n/" starts at root/log/t/n,
        # "a/b" at root/a keeping names that start with "b".
        parent, _, leaf = prefix.rpartition("/")
        start = self.root / parent if parent else self.root
        return self._walk(start, f"{parent}/" if parent else "", leaf)

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview, *, if_absent: bool = False) -> bool:
        return self._publish(key, lambda f: f.write(data), if_absent=if_absent)

    def put_file(
        self, key: str, path: Path, *, if_absent: bool = False, consume: bool = False
    ) -> bool:
        """Copy the local file ``path`` in (streamed, never whole in memory). With ``consume``
        and ``path`` on the store's filesystem, the file itself is published instead (fsynced,
        given the store's file mode, hard-linked into place): no copy, the same guarantees.

        Raises:
            InvalidArgument: ``path`` cannot be read.
            Unavailable: the store cannot be written.
        """
        if consume:
            taken = self._publish_file(key, Path(path), if_absent=if_absent)
            if taken is not None:
                return taken
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path} to store it as {key!r}: {exc}") from exc
        try:
            return self._publish(
                key, lambda f: shutil.copyfileobj(source, f, _COPY_CHUNK), if_absent=if_absent
            )
        finally:
            source.close()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except _MISSING:
            pass
        except OSError as exc:
            raise self._unavailable("delete", key, exc) from exc

    # -- internals -----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        check_key(key)
        if any(segment.startswith(TEMP_PREFIX) for segment in key.split("/")):
            raise InvalidArgument(f"store key {key!r} uses the reserved prefix {TEMP_PREFIX!r}")
        return self.root / key

    def _publish(self, key: str, write: Callable[[BinaryIO], object], *, if_absent: bool) -> bool:
        final = self._path(key)
        if if_absent and os.path.lexists(final):
            return False  # the common case for content-addressed blobs: skip the copy entirely
        directory = final.parent
        temp = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(temp, "xb") as f:
                write(f)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            if final.is_dir():
                raise InvalidArgument(
                    f"local store {self.url}: cannot write {key!r}: it is a prefix of other keys"
                )
            if if_absent:
                try:
                    os.link(temp, final)
                except FileExistsError:
                    return False
            else:
                os.replace(temp, final)
            if self._fsync:
                fsync_directory(directory)
            return True
        except (FileExistsError, NotADirectoryError) as exc:
            # mkdir met a file where a directory must be: a shorter key is an object.
            raise InvalidArgument(
                f"local store {self.url}: cannot write {key!r}: a parent path is an object"
            ) from exc
        except OSError as exc:
            raise self._unavailable("write", key, exc) from exc
        finally:
            with contextlib.suppress(*_MISSING):  # renamed into place, or never made
                os.unlink(temp)

    def _publish_file(self, key: str, path: Path, *, if_absent: bool) -> bool | None:
        """Publish the file ``path`` itself at ``key`` (see :meth:`put_file`); ``None`` when
        it cannot be linked here (another filesystem, say) and must be copied."""
        final = self._path(key)
        if if_absent and os.path.lexists(final):
            return False
        directory = final.parent
        temp = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_dev != os.stat(self.root).st_dev:
                    return None
                # What a file written here would get (a spool file is private, 0600).
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                if self._fsync:
                    os.fsync(f.fileno())
            directory.mkdir(parents=True, exist_ok=True)
            if final.is_dir():
                raise InvalidArgument(
                    f"local store {self.url}: cannot write {key!r}: it is a prefix of other keys"
                )
            if if_absent:
                try:
                    _hard_link(path, final)
                except FileExistsError:
                    return False
            else:
                _hard_link(path, temp)
                os.replace(temp, final)
            if self._fsync:
                fsync_directory(directory)
            return True
        except FileNotFoundError as exc:
            if not path.exists():
                raise InvalidArgument(f"cannot read {path} to store it as {key!r}: {exc}") from exc
            raise self._unavailable("write", key, exc) from exc
        except (FileExistsError, NotADirectoryError) as exc:
            raise InvalidArgument(
                f"local store {self.url}: cannot write {key!r}: a parent path is an object"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                return None  # no hard link here: copy
            raise self._unavailable("write", key, exc) from exc
        finally:
            with contextlib.suppress(*_MISSING):
                os.unlink(temp)

    def _walk(self, directory: Path, key_prefix: str, leaf_prefix: str) -> Iterator[str]:
        try:
            with os.scandir(directory) as it:
                entries = [
                    (entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name)
                    for entry in it
                    if entry.name.startswith(leaf_prefix) and not entry.name.startswith(TEMP_PREFIX)
                ]
        except _MISSING:
            return  # nothing under this prefix, or the directory was removed while walking
        except OSError as exc:
            raise self._unavailable("list", key_prefix + leaf_prefix, exc) from exc
        # Sorting directories as "name/" yields keys in lexicographic order of the full key:
        # "a.b" < "a/x" < "a0" because "." < "/" < "0".
        for name in sorted(entries):
            if name.endswith("/"):
                yield from self._walk(directory / name[:-1], key_prefix + name, "")
            else:
                yield key_prefix + name

    def _unavailable(self, verb: str, key: str, exc: OSError) -> Unavailable:
        return Unavailable(f"local store {self.url}: cannot {verb} {key!r}: {exc}")


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _hard_link(source: Path, target: Path) -> None:
    """Link ``target`` to the file ``source`` names, following a symbolic link at ``source``:
    an open file's ``/proc/self/fd/N`` (``catalog.local_push``) links the very inode this
    process holds. ``os.link`` without a directory descriptor calls link(2), which links the
    symbolic link itself (EXDEV for one in /proc); linkat(2) with AT_SYMLINK_FOLLOW follows."""
    parent = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(source.name, target, src_dir_fd=parent, follow_symlinks=True)
    finally:
        os.close(parent)
