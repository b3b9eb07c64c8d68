"""The one place the SDK makes gRPC channels: plain or TLS, with or without a bearer token.

``grpcs://host:port`` (or a CA file in ``tls_ca`` / ``$LORACAT_TLS_CA``) asks for TLS; a client
certificate and key (``tls_cert``/``tls_key``, ``$LORACAT_TLS_CERT``/``$LORACAT_TLS_KEY``) are
presented when the server wants mutual TLS. A token is sent on every call as
``authorization: Bearer <token>`` call metadata, added by a client interceptor (the same way on
plain and TLS channels, so a loopback catalog with ``--auth`` and no TLS works too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from catalog.client.address import default_target, parse_address
from catalog.client.requests import CHANNEL_OPTIONS
from catalog.errors import InvalidArgument

TLS_SCHEME = "grpcs://"
PLAIN_SCHEME = "grpc://"
TOKEN_ENV = "LORACAT_TOKEN"
TLS_CA_ENV = "LORACAT_TLS_CA"
TLS_CERT_ENV = "LORACAT_TLS_CERT"
TLS_KEY_ENV = "LORACAT_TLS_KEY"


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """Where and how to connect: ``address`` is ``host:port`` without a scheme."""

    address: str
    tls: bool = False
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = None


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None or path == "":
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{what} {path}: cannot read it: {exc.strerror}") from None


def channel_settings(
    target: str | None,
    *,
    token: str | None = None,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> ChannelSettings:
    """Settings for ``target`` (``host:port``, ``grpc://host:port`` or ``grpcs://host:port``;
    None: ``$LORACAT_SERVER``, else ``127.0.0.1:7070``, see ``catalog.client.address``);
    arguments left None fall back to ``$LORACAT_TOKEN``, ``$LORACAT_TLS_CA``,
    ``$LORACAT_TLS_CERT`` and ``$LORACAT_TLS_KEY``.

    Raises ``InvalidArgument`` for an unreadable file, a certificate without its key (or the
    reverse), or a token that cannot travel as metadata.
    """
    token = os.environ.get(TOKEN_ENV) if token is None else token
    tls_ca = os.environ.get(TLS_CA_ENV) if tls_ca is None else tls_ca
    tls_cert = os.environ.get(TLS_CERT_ENV) if tls_cert is None else tls_cert
    tls_key = os.environ.get(TLS_KEY_ENV) if tls_key is None else tls_key
    # host, host:port, grpc:// and grpcs:// URLs
    address, tls = parse_address(default_target() if target is None else target)
    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgument("a TLS client certificate needs its key, and a key its certificate")
    if token is not None and (
        not token or not token.isascii() or not token.isprintable() or token != token.strip()
    ):
        raise InvalidArgument("the token must be non-empty printable ASCII without spaces")
    return ChannelSettings(
        address=address,
        tls=tls or bool(tls_ca) or bool(tls_cert),
        tls_ca=_read(tls_ca, "TLS CA file"),
        tls_cert=_read(tls_cert, "TLS certificate"),
        tls_key=_read(tls_key, "TLS key"),
        token=token or None,
    )


def _credentials(settings: ChannelSettings) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca,
        private_key=settings.tls_key,
        certificate_chain=settings.tls_cert,
    )


def _with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _TokenDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, details: grpc.ClientCallDetails, token: str) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = _with_token(details.metadata, token)
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the token to every call of a sync channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_TokenDetails(details, self._token), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_TokenDetails(details, self._token), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_TokenDetails(details, self._token), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_TokenDetails(details, self._token), requests)


def open_channel(
    settings: ChannelSettings, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS
) -> grpc.Channel:
    """A sync channel for ``settings``."""
    if settings.tls:
        channel = grpc.secure_channel(settings.address, _credentials(settings), options=options)
    else:
        channel = grpc.insecure_channel(settings.address, options=options)
    if settings.token:
        channel = grpc.intercept_channel(channel, _BearerToken(settings.token))
    return channel


def _aio_details(details: Any, token: str) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*_with_token(details.metadata, token)),
        details.credentials,
        details.wait_for_ready,
    )


class _AioUnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioUnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioStreamUnaryToken(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._token), requests)


def open_aio_channel(
    settings: ChannelSettings, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS
) -> grpc.aio.Channel:
    """An asyncio channel for ``settings``."""
    interceptors: list[grpc.aio.ClientInterceptor] = []
    if settings.token:
        interceptors = [
            _AioUnaryUnaryToken(settings.token),
            _AioUnaryStreamToken(settings.token),
            _AioStreamUnaryToken(settings.token),
        ]
    if settings.tls:
        return grpc.aio.secure_channel(
            settings.address, _credentials(settings), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(settings.address, options=options, interceptors=interceptors)
