"""Content digests: ``<algorithm>:<hex>``, computed over the uncompressed pack bytes.

Algorithms live in one registry so a new one is a single entry; sha256 is the default because
every S3 and every tool speaks it, blake3 is there for fetch paths where hashing shows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from catalog.errors import InvalidReference


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def _blake3() -> Hasher:
    import blake3

    return blake3.blake3(max_threads=blake3.blake3.AUTO)


HASHERS: dict[str, tuple[Callable[[], Hasher], int]] = {
    "sha256": (hashlib.sha256, 64),
    "blake3": (_blake3, 64),
}
DEFAULT_ALGORITHM = "sha256"
MIN_PREFIX_HEX = 12
_HEX = re.compile(r"[0-9a-f]+")  # always fullmatch: `$` accepts a trailing newline


@dataclass(frozen=True, order=True, slots=True)
class Digest:
    """A full content digest. ``str(d)`` is ``algorithm:hex``."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        if self.algorithm not in HASHERS:
            raise InvalidReference(f"unknown digest algorithm {self.algorithm!r}")
        width = HASHERS[self.algorithm][1]
        if len(self.hex) != width or not _HEX.fullmatch(self.hex):
            raise InvalidReference(
                f"digest {self.algorithm}:{self.hex[:80]} is not {width} lowercase hex digits"
            )

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:MIN_PREFIX_HEX]}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise InvalidReference(f"digest {text[:80]!r} has no algorithm prefix")
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes | memoryview, algorithm: str = DEFAULT_ALGORITHM) -> Digest:
        hasher = new_hasher(algorithm)
        hasher.update(data)
        return cls(algorithm, hasher.hexdigest())


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Hasher:
    try:
        factory = HASHERS[algorithm][0]
    except KeyError:
        raise InvalidReference(f"unknown digest algorithm {algorithm!r}") from None
    return factory()


def parse_digest_prefix(text: str) -> tuple[str, str]:
    """Split ``algo:hexprefix`` and check it is a usable prefix (at least 12 hex digits)."""
    algorithm, sep, hexpart = text.partition(":")
    if not sep or algorithm not in HASHERS:
        raise InvalidReference(f"digest {text[:80]!r}: expected <algorithm>:<hex>")
    width = HASHERS[algorithm][1]
    if not _HEX.fullmatch(hexpart) or not MIN_PREFIX_HEX <= len(hexpart) <= width:
        raise InvalidReference(
            f"digest {text[:80]!r}: need {MIN_PREFIX_HEX} to {width} lowercase hex digits"
        )
    return algorithm, hexpart
