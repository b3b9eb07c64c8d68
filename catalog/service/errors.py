"""Map catalog exceptions to gRPC status codes, in exactly one place.

``catalog.service.server`` wraps every servicer method once, at registration, with
``abort_for``: a ``CatalogError`` becomes its own status code with its
message, plus trailing metadata ``loracat-error: <ClassName>`` so the client can raise the exact
class again. Anything else is a bug: it is logged with its traceback and sent as INTERNAL.
"""

from __future__ import annotations

import logging

import grpc

from catalog.errors import CatalogError

log = logging.getLogger(__name__)
ERROR_CLASS_KEY = "loracat-error"


def abort_for(context: grpc.ServicerContext, exc: Exception) -> None:
    """End the call with the status ``exc`` maps to: raises what ``context.abort`` raises."""
    if isinstance(exc, CatalogError):
        context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
        context.abort(grpc.StatusCode[exc.grpc_code], exc.message)
    log.exception("unexpected error in a catalog handler")
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def is_abort(exc: BaseException) -> bool:
    """Whether ``exc`` is ``context.abort()``'s own signal, which must pass through untouched."""
    # context.abort() signals by raising a bare ``Exception()``.
    return type(exc) is Exception and not exc.args
