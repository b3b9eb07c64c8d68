"""``write_atomically`` as the pack package has always offered it (``catalog.pack.peft``
re-exports it): an adapter file written whole or not at all, mode ``0o644``, fsynced unless
told otherwise. The mechanism is :mod:`catalog.atomic_files`; new code calls that directly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from catalog import atomic_files

#: Adapter files are read by engines that may run as another user: never mkstemp's 0600 and
#: never narrowed by the writer's umask.
ADAPTER_FILE_MODE = 0o644


def write_atomically(
    path: Path, data: bytes | Sequence[bytes | memoryview], *, fsync: bool = True
) -> None:
    """Write ``data`` (bytes, or chunks written in order) to a temporary file beside ``path``,
    fsync it (unless ``fsync`` is False), and rename it into place (mode ``0o644``; the
    directory is not fsynced).

    Raises:
        OSError: the write, fsync or rename failed (the temporary file is removed).
    """
    atomic_files.write_atomically(path, data, fsync=fsync, mode=ADAPTER_FILE_MODE)
