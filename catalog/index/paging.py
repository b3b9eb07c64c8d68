"""Page sizes, opaque page tokens and listing prefixes, shared by every index backend.

A page token is the ``catalog.keys`` encoding of the last item returned, versioned and
urlsafe-base64 encoded. A token is only valid for the listing it came from: it must lie inside the
listing's key prefix, which is checked, so a token from another listing is refused rather than
silently returning someone else's page.
"""

from __future__ import annotations

import base64
import binascii

from catalog import keys
from catalog.errors import InvalidArgument
from catalog.index.base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from catalog.model import check_part

_TOKEN_VERSION = b"\x01"


def page_size_of(page_size: int) -> int:
    """``0`` means the default (as an unset protobuf field reads); otherwise clamp to
    ``[1, MAX_PAGE_SIZE]``. Raises ``InvalidArgument`` for a negative size or a non-integer."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise InvalidArgument(f"page_size must be an integer, got {type(page_size).__name__}")
    if page_size < 0:
        raise InvalidArgument(f"page_size {page_size} is negative")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def encode_token(last_key: bytes) -> str:
    return base64.urlsafe_b64encode(_TOKEN_VERSION + last_key).decode().rstrip("=")


def decode_token(token: str, scan_prefix: bytes) -> bytes:
    """The last key of the previous page; ``InvalidArgument`` for a token not from this listing."""
    if not isinstance(token, str):
        raise InvalidArgument(f"page_token must be a string, got {type(token).__name__}")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"page_token {token[:40]!r} is not a page token") from None
    last_key = raw[len(_TOKEN_VERSION) :]
    if not raw.startswith(_TOKEN_VERSION) or not last_key:
        raise InvalidArgument(f"page_token {token[:40]!r} is not a page token of this listing")
    if not last_key.startswith(scan_prefix):
        raise InvalidArgument(f"page_token {token[:40]!r} belongs to another listing")
    try:
        keys.decode(last_key)
    except InvalidArgument:
        raise InvalidArgument(f"page_token {token[:40]!r} is corrupt") from None
    return last_key


def adapter_prefix(prefix: str) -> tuple[str, ...]:
    """``""`` -> ``()``, ``"tenant"`` -> ``(tenant,)``, ``"tenant/name"`` -> ``(tenant, name)``.

    Raises ``InvalidName`` for a part that breaks the naming rule.
    """
    if not isinstance(prefix, str):
        raise InvalidArgument(f"prefix must be a string, got {type(prefix).__name__}")
    if not prefix:
        return ()
    tenant, sep, name = prefix.partition("/")
    check_part("tenant", tenant)
    if not sep:
        return (tenant,)
    check_part("name", name)
    return (tenant, name)
