"""Who the current call acts for, as the core sees it: a context variable the service sets.

The service authenticates a call and runs its handler inside ``acting_as(name)``; the core stamps
``caller()`` on every event it writes (``Event.principal``) without importing anything of the
service. Outside a call (tests, tools, a server started without ``--auth``) the caller is the
empty string: anonymous.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CALLER: ContextVar[str] = ContextVar("loracat_caller", default="")


def caller() -> str:
    """The principal the current call acts for; ``""`` when anonymous."""
    return _CALLER.get()


@contextmanager
def acting_as(principal: str) -> Iterator[None]:
    """Run the body as ``principal`` (restored afterwards, also on errors)."""
    token = _CALLER.set(principal)
    try:
        yield
    finally:
        _CALLER.reset(token)
