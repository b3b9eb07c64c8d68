"""Writing a revision as a PEFT directory on an engine's behalf (``ExportPeftDir``).

An engine that loads adapters from a directory path (vLLM) and runs on the catalog's host need
not receive the pack over gRPC and re-serialize it in its own process: the catalog, which reads
the pack anyway, writes the PEFT files into a directory the engine made. What keeps that safe:

* the server writes only when started with a root (``loracat serve --peft-export-root DIR``),
  and only into an existing directory under it (symbolic links resolved first), never into the
  root itself;
* the directory must hold a nonce file (``.loracat-export-nonce``) with exactly the nonce the
  request carries: the caller made the directory and sees the same filesystem as the server
  (a catalog on another host finds no such file and refuses, and the engine reads the pack
  over gRPC instead);
* the server only adds the two PEFT files (each written to a temporary name, renamed into
  place). Publishing the directory is the engine's job: its node cache renames the directory
  into place after this call returns, so a crash of either process mid-write leaves nothing an
  engine would load.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from catalog.bases import base_identity
from catalog.errors import (
    FailedPrecondition,
    IncompatibleAdapter,
    InvalidArgument,
    PermissionDenied,
)
from catalog.model import Revision
from catalog.pack import export_peft_dir
from catalog.pack.peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from catalog.pack_reads import DeferredPackRead

log = logging.getLogger(__name__)

#: The file in the destination that proves who made it (see the module docstring).
NONCE_FILE = ".loracat-export-nonce"
#: How long after an export the NVMe tier is filled with the pack: the engine that asked is
#: loading the adapter meanwhile (vLLM: ~20 ms for a 2.4 MB adapter on two CPU cores), and the
#: fill's checksums, copy and synced commit would compete with that load for the cores and disk.
FILL_DELAY_S = 0.5
#: Nonces shorter than this are refused: they prove nothing.
MIN_NONCE_CHARS = 16


def check_fits(name: str, revision: Revision, served_base: str, max_rank: int) -> None:
    """Refuse ``revision`` (what ``name`` resolved to) for an engine serving ``served_base``
    (a ``base_identity``; empty: any base) with ranks up to ``max_rank`` (0: any). A revision
    with no ``base_id`` passes the base check: the engine still checks shapes when it loads.
    The engine plugin checks with this, and ``ExportPeftDir`` before it reads a byte.

    Raises:
        IncompatibleAdapter: the rank is above ``max_rank``, or the bases differ.
    """
    if max_rank and revision.rank > max_rank:
        raise IncompatibleAdapter(
            f"{name} resolves to {revision.adapter}@{revision.number} of rank "
            f"{revision.rank}, above the engine's --max-lora-rank {max_rank}"
        )
    if not revision.base_id or not served_base:
        return
    if base_identity(revision.base_id) != served_base:
        raise IncompatibleAdapter(
            f"{name} resolves to {revision.adapter}@{revision.number} "
            f"({revision.digest.short}), trained for base {revision.base_id!r}, but the "
            f"engine serves {served_base!r}"
        )


class PeftExporter:
    """Writes PEFT directories under ``root`` (None: the server exports nothing).

    Raises:
        InvalidArgument: ``root`` is not an existing directory.
    """

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root: Path | None = None
        if root is not None:
            resolved = Path(root).resolve()
            if not resolved.is_dir():
                raise InvalidArgument(f"--peft-export-root {root}: not an existing directory")
            self.root = resolved
        # One thread fills the NVMe tier after exports answered from durable bytes (see
        # Catalog.read_pack_bytes_deferred): fills commit one at a time anyway.
        self._fills = ThreadPoolExecutor(1, thread_name_prefix="loracat-export-fill")
        # Digest checks run beside the export's writes (hashlib releases the GIL).
        self._checks = ThreadPoolExecutor(4, thread_name_prefix="loracat-export-check")

    def check_destination(self, dest: str, nonce: str) -> Path:
        """The resolved destination, once it passes every check of the module docstring.

        Raises:
            FailedPrecondition: the server exports nothing (no root), or ``dest`` does not
                hold the request's nonce (another host, or not the caller's directory).
            InvalidArgument: an empty or short nonce, or ``dest`` is not an absolute path.
            PermissionDenied: ``dest`` is not a directory strictly under the root.
        """
        if self.root is None:
            raise FailedPrecondition(
                "this catalog writes no PEFT directories (start it with --peft-export-root)"
            )
        if len(nonce) < MIN_NONCE_CHARS:
            raise InvalidArgument(f"an export nonce needs >= {MIN_NONCE_CHARS} characters")
        if not os.path.isabs(dest):
            raise InvalidArgument(f"export destination {dest!r} is not an absolute path")
        resolved = Path(dest).resolve()
        if resolved == self.root or self.root not in resolved.parents:
            raise PermissionDenied(
                f"export destination {dest} is not under this catalog's --peft-export-root"
            )
        try:
            with open(resolved / NONCE_FILE, encoding="ascii", errors="replace") as handle:
                found = handle.read(256)
        except (FileNotFoundError, NotADirectoryError):
            raise FailedPrecondition(
                f"export destination {dest} holds no {NONCE_FILE} here (is the catalog on "
                "another host?)"
            ) from None
        if not hmac.compare_digest(found, nonce):
            raise FailedPrecondition(f"export destination {dest} holds another caller's nonce")
        return resolved

    def export(self, data: bytes | memoryview, dest: Path, *, fsync: bool) -> int:
        """Write ``data`` (a verified pack) as PEFT files into ``dest`` (checked by
        :meth:`check_destination`); returns the files' total size.

        Raises:
            InvalidPack: the pack cannot be written as a PEFT directory.
        """
        export_peft_dir(data, dest, fsync=fsync)
        return sum((dest / name).stat().st_size for name in (PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE))

    def export_read(self, read: DeferredPackRead, dest: Path, *, fsync: bool) -> int:
        """:meth:`export` of a pack read whose digest check is still to run: the check runs
        beside the writes, and the answer waits for both; then the NVMe tier is filled later.
        The destination is the caller's unpublished directory, so bytes written before the
        check fails are never loaded: they are removed, and the call raises ``DataLoss``.

        Raises:
            DataLoss: the durable copy does not match the revision's digest.
            InvalidPack: the (checked) pack cannot be written as a PEFT directory.
        """
        if read.verify is None:
            return self.export(read.data, dest, fsync=fsync)
        check = self._checks.submit(read.verify)
        try:
            written = self.export(read.data, dest, fsync=fsync)
        except BaseException:
            check.result()  # a corrupt copy is DataLoss, whatever the export made of it
            raise
        finally:
            if check.exception() is not None:
                for name in (PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE):
                    (dest / name).unlink(missing_ok=True)
        check.result()
        if read.fill is not None:
            self.fill_later(read.fill)
        return written

    def fill_later(self, fill: Callable[[], object]) -> Future[None]:
        """Run ``fill`` (a tier fill) on the exporter's thread, ``FILL_DELAY_S`` after now; a
        failure is logged (the next read of the pack fills the tier instead)."""
        due = time.monotonic() + FILL_DELAY_S

        def run() -> None:
            try:
                time.sleep(max(0.0, due - time.monotonic()))
                fill()
            except Exception as exc:
                log.warning("filling the NVMe tier after a PEFT export failed: %s", exc)

        return self._fills.submit(run)

    def close(self) -> None:
        """Wait for the fills in flight."""
        self._checks.shutdown(wait=True)
        self._fills.shutdown(wait=True)
