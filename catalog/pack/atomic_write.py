"""Writing a file so that readers see the old contents or the new, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def write_atomically(
    path: Path, data: bytes | Sequence[bytes | memoryview], *, fsync: bool = True
) -> None:
    """Write ``data`` (bytes, or chunks written in order) to a temporary file beside ``path``,
    fsync it (unless ``fsync`` is False), and rename it into place.

    Raises:
        OSError: the write, fsync or rename failed (the temporary file is removed).
    """
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the adapter from other readers
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                handle.writelines(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
