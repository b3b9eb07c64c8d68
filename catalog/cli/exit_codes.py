"""The `loracat` exit statuses, and the one place errors become a line on stderr and a status.

A script tells failures apart by status alone:

====  =========================================================================================
  0   success
  1   any other failure (an internal error)
  2   invalid input: a bad name, reference, option, pack or adapter directory, an adapter for
      another base than --base (click's usage errors exit 2 as well)
  3   not found: adapter, revision, alias, digest or file
  4   conflict: a lost compare-and-swap (someone moved the alias first), or it exists already
  5   refused by the state: an aliased revision, a non-empty destination, nothing to roll
      back to
  6   unavailable or timed out: no catalog at the address, or no answer within --timeout
  7   permission: no or a bad token, or a principal not allowed to do this
  8   data loss: stored bytes that do not match their digest (``verify`` finding problems)
141   stdout was closed early (``loracat ls | head``): quiet, as a shell's commands are
====  =========================================================================================
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from catalog.errors import (
    AlreadyExists,
    CatalogError,
    Conflict,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

OK = 0
FAILURE = 1
INVALID = 2
NOT_FOUND = 3
CONFLICT = 4
REFUSED = 5
UNAVAILABLE = 6
PERMISSION = 7
DATA_LOSS = 8
CLOSED_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader went away

#: Most specific first: the first class an error is an instance of decides its status.
_STATUS_OF: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidArgument, INVALID),
    (NotFound, NOT_FOUND),
    (Conflict, CONFLICT),
    (AlreadyExists, CONFLICT),
    (FailedPrecondition, REFUSED),
    (Unavailable, UNAVAILABLE),
    (DeadlineExceeded, UNAVAILABLE),
    (Unauthenticated, PERMISSION),
    (PermissionDenied, PERMISSION),
    (DataLoss, DATA_LOSS),
)


def status_for(exc: BaseException) -> int:
    """The exit status of a command that failed with ``exc``."""
    for cls, status in _STATUS_OF:
        if isinstance(exc, cls):
            return status
    if isinstance(exc, FileNotFoundError):
        return NOT_FOUND
    if isinstance(exc, PermissionError):
        return PERMISSION
    return FAILURE


def fail(message: str, status: int) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``status``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(status)


def _quiet_closed_pipe() -> NoReturn:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail too.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(CLOSED_PIPE)


class LoracatGroup(click.Group):
    """Catalog errors and OS errors become one line on stderr and their exit status; a closed
    stdout ends the command quietly."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_closed_pipe()
        except CatalogError as exc:
            fail(str(exc), status_for(exc))
        except OSError as exc:
            text = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            fail(text, status_for(exc))

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except BrokenPipeError:  # raised while click itself was writing (help, usage)
            _quiet_closed_pipe()
