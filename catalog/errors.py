"""The catalog's exception tree.

Every error derives from :class:`CatalogError` and from the builtin it most resembles, so callers
can catch either. Each class names the gRPC status it travels as (by name, so this module does not
import grpc); the service maps them in exactly one place and the client maps them back.
"""

from __future__ import annotations


class CatalogError(Exception):
    """Root of every error the catalog raises on purpose."""

    grpc_code: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(CatalogError, ValueError):
    """The request itself is malformed: a bad name, reference, pack or parameter."""

    grpc_code = "INVALID_ARGUMENT"


class InvalidName(InvalidArgument):
    """An adapter name, tenant or alias breaks the naming rule."""


class InvalidReference(InvalidArgument):
    """A reference string cannot be parsed."""


class InvalidPack(InvalidArgument):
    """A pack or PEFT adapter is malformed, hostile or contradicts its manifest."""


class NotFound(CatalogError, LookupError):
    """The adapter, revision, alias or blob does not exist."""

    grpc_code = "NOT_FOUND"


class AlreadyExists(CatalogError):
    """The thing being created exists already (e.g. an identical revision)."""

    grpc_code = "ALREADY_EXISTS"


class FailedPrecondition(CatalogError):
    """The state does not allow the operation (e.g. deleting an aliased revision)."""

    grpc_code = "FAILED_PRECONDITION"


class IncompatibleAdapter(FailedPrecondition):
    """The adapter does not fit the base it is being attached to or registered for."""


class Conflict(CatalogError):
    """A compare-and-swap lost its race: the expected state was not the current one."""

    grpc_code = "ABORTED"


class ResourceExhausted(CatalogError):
    """A size, count or capacity limit was hit (oversized pack, no free slot)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class DataLoss(CatalogError):
    """Stored bytes do not match their digest, or a durable object is missing or corrupt."""

    grpc_code = "DATA_LOSS"


class Unavailable(CatalogError, ConnectionError):
    """The server or a backing store cannot be reached."""

    grpc_code = "UNAVAILABLE"


class DeadlineExceeded(CatalogError, TimeoutError):
    """The operation did not finish before its deadline."""

    grpc_code = "DEADLINE_EXCEEDED"


class Unauthenticated(CatalogError, PermissionError):
    """The call carries no token, a malformed one, or one the catalog does not know (revoked)."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(CatalogError, PermissionError):
    """The principal's role lacks the capability, or the tenant is outside its reach (said the
    same whether or not the adapter exists)."""

    grpc_code = "PERMISSION_DENIED"


class Internal(CatalogError, RuntimeError):
    """A bug or an unexpected failure; the message says what was being done."""

    grpc_code = "INTERNAL"


class Cancelled(CatalogError):
    grpc_code = "CANCELLED"


def all_error_classes() -> dict[str, type[CatalogError]]:
    """Every concrete error class by name; the client uses it to rebuild the exact class."""
    found: dict[str, type[CatalogError]] = {}
    stack: list[type[CatalogError]] = [CatalogError]
    while stack:
        cls = stack.pop()
        found[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    return found


def error_for_code(code_name: str) -> type[CatalogError]:
    """The most general catalog error that travels as gRPC status ``code_name``."""
    for cls in all_error_classes().values():
        if cls.grpc_code == code_name and all(
            getattr(base, "grpc_code", None) != code_name for base in cls.__mro__[1:]
        ):
            return cls
    return Internal
