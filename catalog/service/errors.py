"""Map catalog exceptions to gRPC status codes, in exactly one place.

``catalog.service.handlers`` ends every failed call with ``status_for``'s answer: a
``CatalogError`` becomes its own status code with its message, plus trailing metadata
``loracat-error: <ClassName>`` so the client can raise the exact class again. Anything else is a
bug: it is logged with its traceback and sent as INTERNAL.
"""

from __future__ import annotations

import logging

import grpc

from catalog.errors import CatalogError

log = logging.getLogger(__name__)
ERROR_CLASS_KEY = "loracat-error"


#: The longest status message sent. Messages may quote client input; unbounded, a 100 KB
#: ``base_id`` came back as a transport error (status details travel in trailing metadata,
#: which gRPC caps at 8-16 KB) instead of the precise status.
MAX_DETAILS_CHARS = 1024


def bounded(details: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """``details`` cut to ``limit`` characters, saying how much was cut."""
    if len(details) <= limit:
        return details
    return f"{details[:limit]}... ({len(details) - limit} more characters cut)"


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str, str | None]:
    """``(status code, details, error class for the trailing metadata or None)`` for ``exc``;
    the details are cut to ``MAX_DETAILS_CHARS``."""
    if isinstance(exc, CatalogError):
        return grpc.StatusCode[exc.grpc_code], bounded(exc.message), type(exc).__name__
    log.error("unexpected error in a catalog handler", exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL,
        bounded(f"internal error: {type(exc).__name__}: {exc}"),
        None,
    )
