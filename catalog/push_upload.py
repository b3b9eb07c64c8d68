"""One push in progress, and the limits a push must respect.

``Catalog.open_push`` (``catalog.core``) makes a :class:`PushUpload`; its ``commit`` validates
the spooled pack and hands it back to the catalog's write path.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.digest import Digest, new_hasher
from catalog.errors import CatalogError, DataLoss, InvalidArgument
from catalog.model import AdapterName, Revision
from catalog.pack import read_pack

if TYPE_CHECKING:
    from catalog.core import Catalog


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask of the catalog."""

    max_pack_bytes: int = 16 << 30
    max_metadata_entries: int = 64
    max_metadata_key: int = 128
    max_metadata_value: int = 64 << 10
    max_aliases_per_push: int = 16


class PushUpload:
    """One push in progress: bytes are spooled to local disk and hashed as they arrive.

    Use as a context manager; leaving it without :meth:`commit` discards the spool file.
    """

    def __init__(
        self,
        catalog: Catalog,
        adapter: AdapterName,
        *,
        size_bytes: int,
        base_id: str,
        aliases: tuple[str, ...],
        metadata: dict[str, str],
        expected_digest: Digest | None,
    ) -> None:
        self._catalog = catalog
        self.adapter = adapter
        self.size_bytes = size_bytes
        self.base_id = base_id
        self.aliases = aliases
        self.metadata = metadata
        self.expected_digest = expected_digest
        self._hasher = new_hasher(catalog.digest_algorithm)
        # A client may state the digest in another algorithm: check it with its own hasher.
        self._check_hasher = (
            new_hasher(expected_digest.algorithm)
            if expected_digest is not None and expected_digest.algorithm != catalog.digest_algorithm
            else None
        )
        self.received = 0
        fd, name = tempfile.mkstemp(prefix="push-", suffix=".pack", dir=catalog.spool_dir)
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)

    def write(self, chunk: bytes | memoryview) -> None:
        if self.received + len(chunk) > self.size_bytes:
            raise InvalidArgument(
                f"push of {self.adapter}: more bytes than the declared {self.size_bytes}"
            )
        self._file.write(chunk)
        self._hasher.update(chunk)
        if self._check_hasher is not None:
            self._check_hasher.update(chunk)
        self.received += len(chunk)

    def commit(self) -> tuple[Revision, bool]:
        """Validate the pack and commit it as a new revision.

        Returns ``(revision, created)``; ``created`` is False when a live revision of the adapter
        already has these exact bytes (a retried push), which is returned instead.
        Raises ``InvalidArgument`` (truncated transfer), ``DataLoss`` (bytes hash differently from
        ``expected_digest``), ``InvalidPack`` (malformed pack), ``Conflict`` (another writer).
        """
        self._file.close()
        if self.received != self.size_bytes:
            raise InvalidArgument(
                f"push of {self.adapter} truncated: received {self.received} of "
                f"{self.size_bytes} declared bytes"
            )
        digest = Digest(self._catalog.digest_algorithm, self._hasher.hexdigest())
        if self.expected_digest is not None:
            stated = (
                digest
                if self._check_hasher is None
                else Digest(self.expected_digest.algorithm, self._check_hasher.hexdigest())
            )
            if stated != self.expected_digest:
                raise DataLoss(
                    f"push of {self.adapter}: bytes hash to {stated}, "
                    f"expected {self.expected_digest}"
                )
        manifest = self._validate_pack()
        return self._catalog._commit_push(self, digest, manifest)

    def _validate_pack(self) -> dict[str, Any]:
        if self.size_bytes == 0:
            from catalog.errors import InvalidPack

            raise InvalidPack(f"push of {self.adapter}: the pack is empty")
        failure: CatalogError | None = None
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                manifest = read_pack(memoryview(mm)).manifest
            except CatalogError as exc:
                # Re-raised below as a fresh exception: the traceback's frames hold views into
                # the mapping, which must be gone before it can close.
                failure = type(exc)(exc.message)
        if failure is not None:
            raise failure
        if not manifest.base_id:
            raise InvalidArgument(f"push of {self.adapter}: the pack names no base_id")
        if self.base_id and self.base_id != manifest.base_id:
            raise InvalidArgument(
                f"push of {self.adapter}: base_id {self.base_id!r} given, but the pack was built "
                f"for {manifest.base_id!r}"
            )
        return manifest.to_json()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> PushUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
