"""Options and argument parsing shared by the `loracat` commands."""

from __future__ import annotations

from typing import Any

import click

from catalog.errors import InvalidArgument
from catalog.model import AdapterName

DEFAULT_SERVER = "127.0.0.1:7070"
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_TRANSFER_TIMEOUT = 3600.0

_server = click.option(
    "--server",
    envvar="LORACAT_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    help="Catalog address: HOST, HOST:PORT (port 7070 by default), grpc://HOST[:PORT], or "
    "grpcs://HOST[:PORT] for TLS (or $LORACAT_SERVER).",
)
_timeout = click.option(
    "--timeout",
    envvar="LORACAT_TIMEOUT",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    expose_value=False,
    callback=lambda ctx, param, value: _remember(ctx, param, value),
    help="Seconds to wait for the catalog's answer (default: 30 for calls, 3600 for pack "
    "transfers, gc, verify and reindex); past it the command exits 6 (or $LORACAT_TIMEOUT).",
)
#: Connection options beside --server; ``connect`` reads them from the click context, so the
#: commands take only ``server``.
_CONNECTION_OPTIONS = (
    ("--token", "LORACAT_TOKEN", "Bearer token for a catalog served with --auth."),
    ("--tls-ca", "LORACAT_TLS_CA", "CA certificate (PEM) that signed the server's: use TLS."),
    ("--tls-cert", "LORACAT_TLS_CERT", "Client certificate (PEM) for mutual TLS."),
    ("--tls-key", "LORACAT_TLS_KEY", "Client key (PEM) for mutual TLS."),
)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[f"loracat.{param.name}"] = value
    return value


def server_option(command: Any) -> Any:
    """--server, --timeout and the token and TLS options every client command takes."""
    for flag, env, text in reversed(_CONNECTION_OPTIONS):
        command = click.option(
            flag,
            envvar=env,
            default=None,
            expose_value=False,
            callback=_remember,
            help=f"{text} (or ${env})",
        )(command)
    return _server(_timeout(command))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON only, on stdout.")


def connect(server: str) -> Any:
    """A client for ``server`` with the command's --token and --tls-* options."""
    from catalog.client import CatalogClient

    context = click.get_current_context(silent=True)
    meta = context.meta if context is not None else {}
    timeout = meta.get("loracat.timeout")
    return CatalogClient(
        server,
        timeout=timeout or DEFAULT_CALL_TIMEOUT,
        token=meta.get("loracat.token"),
        tls_ca=meta.get("loracat.tls_ca"),
        tls_cert=meta.get("loracat.tls_cert"),
        tls_key=meta.get("loracat.tls_key"),
    )


def transfer_timeout() -> float:
    """The deadline of a long call (a pack transfer, gc, verify, reindex): --timeout if given."""
    context = click.get_current_context(silent=True)
    timeout = context.meta.get("loracat.timeout") if context is not None else None
    return float(timeout or DEFAULT_TRANSFER_TIMEOUT)


def parse_name(text: str) -> AdapterName:
    return AdapterName.parse(text)


def parse_expect(text: str | None) -> int | None:
    if text is None:
        return None
    if text in ("none", "unset"):
        return 0
    if not text.isdigit():
        raise InvalidArgument(f"--expect takes a revision number or 'none', got {text!r}")
    return int(text)


def parse_bytes(text: str) -> int:
    """``123``, ``64M``, ``8G``, ``1.5T`` (binary multiples) -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in units else ""
    try:
        number = float(value[: len(value) - len(suffix)])
    except ValueError:
        raise InvalidArgument(f"not a byte size: {text!r} (e.g. 1073741824, 512M, 8G)") from None
    if number < 0:
        raise InvalidArgument(f"byte size must be >= 0, got {text!r}")
    return int(number * units[suffix])
