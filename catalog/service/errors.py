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


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str, str | None]:
    """``(status code, details, error class for the trailing metadata or None)`` for ``exc``."""
    if isinstance(exc, CatalogError):
        return grpc.StatusCode[exc.grpc_code], exc.message, type(exc).__name__
    log.error("unexpected error in a catalog handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", None
