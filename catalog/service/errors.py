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


class ErrorMappingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_streaming(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_streaming(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
