"""Map catalog exceptions to gRPC status codes, in exactly one place.

The interceptor wraps every handler: a ``CatalogError`` becomes its own status code with its
message, plus trailing metadata ``loracat-error: <ClassName>`` so the client can raise the exact
class again. Anything else is a bug: it is logged with its traceback and sent as INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from catalog.errors import CatalogError

log = logging.getLogger(__name__)
ERROR_CLASS_KEY = "loracat-error"


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, CatalogError):
        context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
        context.abort(grpc.StatusCode[exc.grpc_code], exc.message)
    log.exception("unexpected error in a catalog handler")
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _wrap_unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc)

    return handler


def _wrap_streaming(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
) -> Callable[..., Iterator[Any]]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc)

    return handler


def _is_abort(exc: BaseException) -> bool:
    # context.abort() signals by raising a bare ``Exception()``; it must pass through untouched.
    return type(exc) is Exception and not exc.args


UnaryBehavior = Callable[[Any, grpc.ServicerContext], Any]
StreamBehavior = Callable[[Any, grpc.ServicerContext], Iterator[Any]]


def rewrap(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable[[UnaryBehavior], UnaryBehavior],
    wrap_streaming: Callable[[StreamBehavior], StreamBehavior],
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (unary or streaming responses)."""
    for kind, factory, wrap in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_unary),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_unary),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_streaming),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_streaming),
    ):
        behavior = getattr(handler, kind)
        if behavior:
            return factory(
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class CachingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Wraps each method's handler once; gRPC asks the interceptor on every call."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self._handlers[method] = self.wrap(method, handler)
        return wrapped


class ErrorMappingInterceptor(CachingInterceptor):
    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return rewrap(handler, _wrap_unary, _wrap_streaming)
