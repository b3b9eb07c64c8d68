"""One push in progress, and the limits a push must respect.

``Catalog.open_push`` (``catalog.core``) makes a :class:`PushUpload`; its ``commit`` validates
the spooled pack and hands it back to the catalog's write path.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.digest import Digest, new_hasher
from catalog.errors import (
    CatalogError,
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    InvalidPack,
)
from catalog.model import AdapterName, Revision
from catalog.pack import read_pack
from catalog.pack.finite import check_finite
from catalog.pack.format import pack_header_nbytes, read_pack_header
from catalog.spool import SpoolReservation

if TYPE_CHECKING:
    from catalog.cache.pack_cache import PackCache
    from catalog.core import Catalog


#: A push is not committed with less than this many seconds left before the client's deadline.
DEADLINE_MARGIN_S = 0.25


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask of the catalog."""

    max_pack_bytes: int = 16 << 30
    max_metadata_entries: int = 64
    max_metadata_key: int = 128
    max_metadata_value: int = 64 << 10
    max_aliases_per_push: int = 16
    #: Bytes all pushes in flight may hold in the spool at once (see ``catalog.spool``).
    max_spool_bytes: int = 64 << 30
    #: Engine records (see ``catalog.engines``): per principal, their TTL, digests per report.
    max_engines_per_principal: int = 64
    engine_ttl_s: float = 600.0
    max_reported_digests: int = 4096


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
        reservation: SpoolReservation | None = None,
    ) -> None:
        self._catalog = catalog
        self._reservation = reservation
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
        #: Seconds left before the client's deadline (None: no deadline), set by the service;
        #: see :meth:`check_deadline`.
        self.time_left: Callable[[], float | None] | None = None
        #: The tier's chunk size and chunk checksums of the pack, when whoever hashed it took
        #: them from the same bytes (``catalog.local_push``): :meth:`admit` need not again.
        self.tier_checksums: tuple[int, bytes] | None = None
        # The pack's leading bytes until its header is complete and checked; then None.
        self._header: bytearray | None = bytearray()
        try:
            fd, name = tempfile.mkstemp(prefix="push-", suffix=".pack", dir=catalog.spool_dir)
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self._owns_path = True  # False once commit_file took a file the caller owns

    def write(self, chunk: bytes | memoryview) -> None:
        """Spool ``chunk``. Raises ``InvalidArgument`` past the declared size, and
        ``InvalidPack`` as soon as the pack's header has arrived and is wrong (so a hostile
        push is refused after its header, not after its whole body was spooled)."""
        if self.received + len(chunk) > self.size_bytes:
            raise InvalidArgument(
                f"push of {self.adapter}: more bytes than the declared {self.size_bytes}"
            )
        if self._header is not None:
            self._check_header(chunk)
        self._file.write(chunk)
        self._hasher.update(chunk)
        if self._check_hasher is not None:
            self._check_hasher.update(chunk)
        self.received += len(chunk)

    def check_deadline(self) -> None:
        """Raise ``DeadlineExceeded`` when the client's deadline is (almost) past.

        Called right before the event that commits the push is written: past that point the
        client would be told DEADLINE_EXCEEDED about a revision that exists. The margin covers
        the log write itself; should that write take longer still, a retry of the same bytes
        answers with the revision (``created=False``), so the client learns the truth.
        """
        left = None if self.time_left is None else self.time_left()
        if left is not None and left < DEADLINE_MARGIN_S:
            raise DeadlineExceeded(
                f"push of {self.adapter}: the client's deadline passed before the revision was "
                "committed; nothing was committed"
            )

    def _check_header(self, chunk: bytes | memoryview) -> None:
        """Buffer the pack's leading bytes until its header is complete, then check it."""
        assert self._header is not None
        view, taken = memoryview(chunk), 0
        while len(self._header) < (
            needed := pack_header_nbytes(bytes(self._header[:8])) if len(self._header) >= 8 else 8
        ):  # pack_header_nbytes raises InvalidPack for a header length over the limit
            more = view[taken : taken + needed - len(self._header)]
            if not more:
                return  # the rest of the header comes in the next chunk
            self._header += more
            taken += len(more)
        manifest, total = read_pack_header(bytes(self._header))
        self._header = None
        if total != self.size_bytes:
            raise InvalidPack(
                f"push of {self.adapter}: the pack's header describes {total} bytes, but "
                f"{self.size_bytes} were declared"
            )
        self._check_base(manifest.base_id)

    def _check_base(self, pack_base_id: str) -> None:
        if not pack_base_id:
            raise InvalidArgument(f"push of {self.adapter}: the pack names no base_id")
        if self.base_id and self.base_id != pack_base_id:
            raise InvalidArgument(
                f"push of {self.adapter}: base_id {self.base_id[:200]!r} given, but the pack "
                f"was built for {pack_base_id!r}"
            )

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

    def commit_file(
        self,
        path: Path,
        digest_of: Callable[[], Digest],
        *,
        before_commit: Callable[[], None] = lambda: None,
    ) -> tuple[Revision, bool]:
        """:meth:`commit` the file ``path`` instead of the bytes written (none may have been):
        the caller hashes it (``digest_of()``, in the catalog's algorithm, asked for after
        the pack's validation, so the hash may run beside it) and guarantees that it does not
        change (a leased inbox file, ``catalog.local_push``); it is given to the store as the
        spool file would be (linked into a ``file://`` store on its filesystem) but never
        deleted here. ``before_commit`` runs after the checks, right before the commit (it
        may raise to refuse). Raises as :meth:`commit`."""
        if self.received:
            raise InvalidArgument(f"push of {self.adapter}: bytes were written and a file given")
        self._file.close()
        self.path.unlink(missing_ok=True)  # the empty spool file: the pack is ``path``
        self.path, self._owns_path = path, False
        self.received = path.stat().st_size
        if self.received != self.size_bytes:
            raise InvalidArgument(
                f"push of {self.adapter}: the file holds {self.received} bytes, "
                f"{self.size_bytes} were declared"
            )
        manifest = self._validate_pack()
        digest = digest_of()
        if digest.algorithm != self._catalog.digest_algorithm:
            raise InvalidArgument(f"push of {self.adapter}: a {digest.algorithm} digest given")
        if self.expected_digest is not None and self.expected_digest != digest:
            if self.expected_digest.algorithm != digest.algorithm:
                raise InvalidArgument(
                    f"push of {self.adapter}: state the digest in {digest.algorithm}"
                )
            raise DataLoss(
                f"push of {self.adapter}: bytes hash to {digest}, expected {self.expected_digest}"
            )
        before_commit()
        return self._catalog._commit_push(self, digest, manifest)

    def _validate_pack(self) -> dict[str, Any]:
        if self.size_bytes == 0:
            raise InvalidPack(f"push of {self.adapter}: the pack is empty")
        failure: CatalogError | None = None
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pack = None
            try:
                pack = read_pack(memoryview(mm))
                manifest = pack.manifest
                check_finite(pack, what=f"push of {self.adapter}")
            except CatalogError as exc:
                # Re-raised below as a fresh exception: the traceback's frames hold views into
                # the mapping, which must be gone before it can close.
                failure = type(exc)(exc.message)
            finally:
                pack = None  # its tensors are views into the mapping too
        if failure is not None:
            raise failure
        self._check_base(manifest.base_id)
        return manifest.to_json()

    def admit(self, cache: PackCache, digest: Digest) -> bool:
        """Put the pack just committed as ``digest`` in the NVMe tier ``cache``
        (``catalog.cache.admission``); whether it was admitted. Its bytes were hashed to
        ``digest`` and checked finite by :meth:`commit`, and the spool file is the catalog's
        own (or, linked into a ``file://`` store, the store's immutable file): nothing is read
        twice but the chunk checksums. Raises ``FailedPrecondition`` when the cache is closed."""
        with (
            open(self.path, "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
            memoryview(mm) as view,
        ):
            return cache.admit_verified(
                digest,
                view,
                values_finite=True,
                name_for_errors=f"push of {self.adapter}",
                checksums=self.tier_checksums,
            )

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._owns_path:
            self.path.unlink(missing_ok=True)
        if self._reservation is not None:
            self._reservation.release()

    def __enter__(self) -> PushUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
