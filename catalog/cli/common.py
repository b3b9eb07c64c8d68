"""Options and argument parsing shared by the `loracat` commands."""

from __future__ import annotations

from typing import Any

import click

from catalog.errors import InvalidArgument
from catalog.model import AdapterName

DEFAULT_SERVER = "127.0.0.1:7070"

server_option = click.option(
    "--server",
    envvar="LORACAT_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    help="Catalog address HOST:PORT (or $LORACAT_SERVER).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON only, on stdout.")


def connect(server: str) -> Any:
    from catalog.client import CatalogClient

    return CatalogClient(server)


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
