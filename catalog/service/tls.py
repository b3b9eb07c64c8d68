"""Server-side TLS: the catalog's certificate and key, and a client CA for mutual TLS."""

from __future__ import annotations

from pathlib import Path

import grpc

from catalog.errors import InvalidArgument


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{what} {path}: cannot read it: {exc.strerror}") from None


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca``, clients must present a certificate
    signed by it (mutual TLS). Raises ``InvalidArgument`` for an unreadable file."""
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=None if client_ca is None else _read(client_ca, "TLS client CA"),
        require_client_auth=client_ca is not None,
    )
