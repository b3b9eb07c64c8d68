"""Turn a ``grpc.RpcError`` back into the catalog exception the server raised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from catalog.errors import CatalogError, Unavailable, all_error_classes, error_for_code

ERROR_CLASS_KEY = "loracat-error"


def error_from_rpc(exc: grpc.RpcError, target: str) -> CatalogError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls: type[CatalogError] | None = None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_CLASS_KEY:
            cls = all_error_classes().get(str(value))
    if cls is None or cls.grpc_code != code.name:
        cls = error_for_code(code.name)
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"catalog at {target} is unavailable: {details}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"catalog at {target} did not answer in time: {details}"
    return cls(details or code.name.lower())


def not_ready(target: str) -> Unavailable:
    """The error of a client whose channel did not connect in time."""
    return Unavailable(f"catalog at {target} is unavailable")


@contextmanager
def translated(target: str) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, target) from None
