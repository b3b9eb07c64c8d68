"""Whether the index may have lost writes: a marker that remembers the boot and a clean close.

The LMDB index commits without fsync. Its writes reach the page cache, which survives a crash of
the server process (SIGKILL, OOM) but not a crash of the machine. So:

- closed cleanly: nothing to do;
- stopped uncleanly during the same boot: nothing was lost, and the intents recorded before each
  durable write let ``Catalog.recover`` finish the interrupted events;
- stopped uncleanly before a reboot: recent index writes, intents included, may be gone, so the
  index is rebuilt from the durable log, which is always written synchronously.

This trades a full reindex after a power loss for several fsyncs less on every write.
"""

from __future__ import annotations

import json
from pathlib import Path

from catalog.atomic_files import write_atomically

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id() -> str:
    """The kernel's id of this boot; empty where the platform has none (then every unclean stop
    is treated as a reboot)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


class ShutdownMarker:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _write(self, clean: bool) -> None:
        state = json.dumps({"boot_id": current_boot_id(), "clean": clean})
        # The file and then its directory are fsynced: without the directory, a power cut can
        # undo the rename and bring back the marker before it, which after open() is the
        # "clean" one of the last close, and that would hide the index writes lost since.
        write_atomically(self.path, state, fsync=True, fsync_dir=True)

    def open(self) -> bool:
        """Mark the index in use; returns True when it must be rebuilt from the durable log."""
        must_rebuild = False
        try:
            state = json.loads(self.path.read_text())
            boot = current_boot_id()
            must_rebuild = not state.get("clean", False) and (
                not boot or state.get("boot_id") != boot
            )
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            must_rebuild = True
        self._write(clean=False)
        return must_rebuild

    def close(self) -> None:
        """Mark a clean close (every index write is on disk after the index itself closed)."""
        self._write(clean=True)
