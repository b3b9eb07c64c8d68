"""The durable-tier abstraction: a flat key -> bytes store (zarr-python's ``Store`` in spirit).

Keys are ``/``-separated relative paths (``blobs/sha256/ab/<hex>``). A missing key reads as
``None``; the catalog layer decides whether that is ``NotFound`` or ``DataLoss``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

from catalog.errors import InvalidArgument


class BlobStore(ABC):
    """A durable object store.

    Capability flags say what a backend can do natively, so callers branch on them instead of
    trying an operation and catching the failure.
    """

    #: ``put(..., if_absent=True)`` is atomic against concurrent writers (S3 ``If-None-Match: *``,
    #: ``O_EXCL`` + rename on a local disk). Without it the store emulates it with a check first.
    supports_conditional_put: bool = False
    #: ``get_range`` reads only the requested bytes rather than the whole object.
    supports_ranges: bool = False

    #: A URL that names this store (``file:///...``, ``s3://bucket/prefix``, ``memory://``).
    url: str = ""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The whole object, or ``None`` when it does not exist."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        """``length`` bytes from ``start`` (fewer at the end of the object); ``None`` if missing."""

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview, *, if_absent: bool = False) -> bool:
        """Store ``data`` at ``key``.

        With ``if_absent`` the object is written only when no object exists at ``key``; the
        return value says whether this call wrote it (``False``: it existed and was kept).
        Readers never see a partially written object.
        """

    def put_file(
        self, key: str, path: Path, *, if_absent: bool = False, consume: bool = False
    ) -> bool:
        """Like :meth:`put`, from a local file (backends may stream or use multipart).

        ``consume``: the caller gives ``path`` up (it never changes the file again and deletes
        its name afterwards), so a backend may take the file itself instead of copying it.

        Raises:
            InvalidArgument: ``path`` cannot be read.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path} to store it as {key!r}: {exc}") from exc
        return self.put(key, data, if_absent=if_absent)

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size in bytes, or ``None`` when it does not exist."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix``, in lexicographic order (flat, no delimiters)."""

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """Several objects at once; backends with async I/O fetch them concurrently."""
        return {key: self.get(key) for key in keys}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
