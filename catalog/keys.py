"""Ordered, prefix-safe keys for LMDB, and the matching object paths.

A key is a tuple of parts encoded so that byte order is tuple order and the encoding of a tuple
is a prefix of the encoding of every longer tuple that starts with it, and of nothing else:

- ``str``: ``b"s"`` + UTF-8 + ``b"\\x00"``. The terminator is what makes ``("acme",)`` a prefix of
  ``("acme", "x")`` but not of ``("acme2", "x")``. Names follow ``[a-z0-9][a-z0-9._-]{0,62}``, so
  ``\\x00`` never occurs inside one; any string holding it is refused.
- ``int``: ``b"i"`` + 8 bytes big-endian, unsigned, so numbers sort numerically.
- ``bytes``: ``b"b"`` + the raw bytes, last part only (it has no terminator). A shorter ``bytes``
  tail is a prefix of every longer one, which is what digest-prefix lookups scan for.

The one-byte tag before each part lets :func:`decode` return the original tuple with no schema.
"""

from __future__ import annotations

from catalog.errors import InvalidArgument

Part = str | int | bytes

_STR = 0x73  # "s"
_INT = 0x69  # "i"
_BYTES = 0x62  # "b"
_INT_WIDTH = 8
_INT_MAX = (1 << (8 * _INT_WIDTH)) - 1
_PATH_INT_DIGITS = 12


def encode(*parts: Part) -> bytes:
    """Encode a tuple of parts; the encoding of a prefix tuple is a byte prefix of it, and
    ``encode(*a) + encode(*b) == encode(*a, *b)`` when ``a`` has no ``bytes`` part.

    Raises ``InvalidArgument`` for a string holding ``\\x00``, a negative or too large integer,
    a ``bytes`` part anywhere but last, or a part of another type.
    """
    out: list[bytes] = []
    for part in parts:
        # exact types first: this is on every index read and write
        if type(part) is str and "\x00" not in part:
            out.append(b"s" + part.encode() + b"\x00")
        elif type(part) is int and 0 <= part <= _INT_MAX:
            out.append(b"i" + part.to_bytes(_INT_WIDTH, "big"))
        elif type(part) is bytes and len(out) == len(parts) - 1:
            out.append(b"b" + part)
        else:
            out.append(_encode_other(part, len(out), len(parts)))
    return b"".join(out)


def _encode_other(part: object, position: int, count: int) -> bytes:
    if isinstance(part, bool):  # an int subclass; a flag in a key is a bug, not a number
        raise InvalidArgument(f"key part {position} is a bool, not an int")
    if isinstance(part, str):
        if "\x00" in part:
            raise InvalidArgument(f"key part {position} {part[:80]!r} contains NUL")
        return encode(str(part))
    if isinstance(part, int):
        if not 0 <= part <= _INT_MAX:
            raise InvalidArgument(f"key part {position} {part} is outside 0..2**64-1")
        return encode(int(part))
    if isinstance(part, bytes | bytearray | memoryview):
        if position != count - 1:
            raise InvalidArgument(f"key part {position} is bytes but not the last part")
        return b"b" + bytes(part)
    raise InvalidArgument(f"key part {position} has unsupported type {type(part).__name__}")


def prefix(*parts: Part) -> bytes:
    """The scan prefix of every key that starts with ``parts`` (the same bytes as ``encode``)."""
    return encode(*parts)


def decode(key: bytes) -> tuple[Part, ...]:
    """Inverse of :func:`encode`; raises ``InvalidArgument`` for bytes that are not a key."""
    parts: list[Part] = []
    position = 0
    size = len(key)
    while position < size:
        tag = key[position]
        position += 1
        if tag == _STR:
            end = key.find(b"\x00", position)
            if end < 0:
                raise InvalidArgument(f"key {key[:80]!r}: unterminated string part")
            try:
                parts.append(key[position:end].decode())
            except UnicodeDecodeError:
                raise InvalidArgument(f"key {key[:80]!r}: string part is not UTF-8") from None
            position = end + 1
        elif tag == _INT:
            end = position + _INT_WIDTH
            if end > size:
                raise InvalidArgument(f"key {key[:80]!r}: truncated integer part")
            parts.append(int.from_bytes(key[position:end], "big"))
            position = end
        elif tag == _BYTES:
            parts.append(bytes(key[position:]))
            position = size
        else:
            raise InvalidArgument(f"key {key[:80]!r}: unknown part tag {tag:#04x}")
    return tuple(parts)


def successor(key_prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``key_prefix`` (``None``: no bound).

    Used as the exclusive upper bound of a prefix range and to start reverse scans.
    """
    trimmed = key_prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def object_path(*parts: str | int) -> str:
    """``a/b/000000000007``: the same tuple as an object path, still prefix-safe and ordered.

    Strings must be non-empty and free of ``/`` (the separator); integers are zero-padded to 12
    digits so a lexicographic listing returns them in numeric order. Raises ``InvalidArgument``.
    """
    out: list[str] = []
    for position, part in enumerate(parts):
        if isinstance(part, bool):
            raise InvalidArgument(f"path part {position} is a bool, not an int")
        if isinstance(part, str):
            if not part or "/" in part or "\x00" in part:
                raise InvalidArgument(f"path part {position} {part[:80]!r} is empty or has '/'")
            out.append(part)
        elif isinstance(part, int):
            if not 0 <= part < 10**_PATH_INT_DIGITS:
                raise InvalidArgument(f"path part {position} {part} does not fit 12 digits")
            out.append(f"{part:0{_PATH_INT_DIGITS}d}")
        else:
            raise InvalidArgument(
                f"path part {position} has unsupported type {type(part).__name__}"
            )
    return "/".join(out)


def object_prefix(*parts: str | int) -> str:
    """The listing prefix of paths under ``parts``; the trailing ``/`` keeps ``acme2`` out."""
    return object_path(*parts) + "/" if parts else ""
