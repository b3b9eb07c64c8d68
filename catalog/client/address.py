"""What a catalog address may look like, and the ``host:port`` gRPC dials for it.

Accepted: ``host``, ``host:port``, ``[v6]``, ``[v6]:port``, and any of them after ``grpc://``
(plain) or ``grpcs://`` (TLS), with an optional trailing ``/``. Without a port the catalog's
default port 7070 is used (gRPC itself would dial 443). Anything else is refused before a
connection is tried.
"""

from __future__ import annotations

import os
import re

from catalog.errors import InvalidArgument

DEFAULT_PORT = 7070
TLS_SCHEME = "grpcs://"
PLAIN_SCHEME = "grpc://"

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\]")


SERVER_ENV = "LORACAT_SERVER"
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"


def default_target() -> str:
    """Where a client connects when given no address: ``$LORACAT_SERVER``, else the local
    catalog on its default port."""
    return os.environ.get(SERVER_ENV) or DEFAULT_TARGET


def parse_address(target: str) -> tuple[str, bool]:
    """``(host:port, tls)`` for ``target``; ``tls`` is True for ``grpcs://``.

    Raises ``InvalidArgument`` naming the address and what is wrong with it.
    """
    if not isinstance(target, str) or not target.strip():
        raise InvalidArgument("the catalog address is empty (expected HOST[:PORT])")
    text = target.strip()
    tls = text.startswith(TLS_SCHEME)
    scheme, sep, _ = text.partition("://")
    if sep and f"{scheme}://" not in (TLS_SCHEME, PLAIN_SCHEME):
        raise InvalidArgument(
            f"catalog address {target!r}: unknown scheme {scheme!r} (use grpc:// or grpcs://)"
        )
    rest = text.removeprefix(TLS_SCHEME).removeprefix(PLAIN_SCHEME).removesuffix("/")
    if rest.startswith("["):
        host, _, after = rest.partition("]")
        host += "]"
        port_text = after.removeprefix(":") if after.startswith(":") else None
        if after and port_text is None:
            raise InvalidArgument(f"catalog address {target!r}: expected [V6]:PORT")
    elif rest.count(":") > 1:
        raise InvalidArgument(f"catalog address {target!r}: write an IPv6 host as [V6]:PORT")
    else:
        host, colon, port_text_or_empty = rest.partition(":")
        port_text = port_text_or_empty if colon else None
    if not _HOST.fullmatch(host):
        raise InvalidArgument(f"catalog address {target!r}: {host!r} is not a host name")
    if port_text is None:
        port = DEFAULT_PORT
    elif port_text.isdigit() and port_text.isascii() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise InvalidArgument(f"catalog address {target!r}: port must be 1-65535")
    return f"{host}:{port}", tls
