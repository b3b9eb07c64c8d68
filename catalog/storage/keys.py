"""The key rule every backend enforces, so a key that works on one store works on all of them.

A key is a ``/``-separated relative path of non-empty segments. ``.`` and ``..`` segments, a
leading or trailing ``/`` and control characters are refused: on a local disk they would escape
the store's root or alias another key, and S3 would accept them only to make them unreadable
through a file system view of the same bucket.
"""

from __future__ import annotations

from catalog.errors import InvalidArgument

#: Upper bound on a key's UTF-8 length; S3 allows 1024 bytes.
MAX_KEY_BYTES = 1024


def check_key(key: str) -> str:
    """Return ``key`` unchanged if it is a valid store key.

    Raises:
        InvalidArgument: the key is empty, too long, absolute, has empty, ``.`` or ``..``
            segments, a backslash or a control character.
    """
    if not isinstance(key, str):
        raise InvalidArgument(f"store key must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidArgument("store key must not be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidArgument(f"store key is longer than {MAX_KEY_BYTES} bytes: {key[:80]!r}...")
    if any(ord(ch) < 0x20 or ch in "\x7f\\" for ch in key):
        raise InvalidArgument(f"store key has a control character or backslash: {key[:80]!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(
                f"store key {key[:80]!r} has an empty, '.' or '..' segment "
                "(keys are relative paths like 'blobs/sha256/ab/<hex>')"
            )
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start a valid key (``""`` lists everything).

    Raises:
        InvalidArgument: as :func:`check_key`, except that a trailing ``/`` is allowed.
    """
    if prefix == "":
        return prefix
    check_key(prefix.removesuffix("/") if prefix.endswith("/") else prefix)
    return prefix


def check_range(key: str, start: int, length: int) -> None:
    """Raises ``InvalidArgument`` for a negative start or length."""
    if start < 0 or length < 0:
        raise InvalidArgument(
            f"invalid byte range for {key!r}: start={start}, length={length} (both must be >= 0)"
        )
