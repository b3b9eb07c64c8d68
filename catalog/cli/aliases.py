"""`loracat alias set | rm | history` and `loracat rollback`: moving names, by compare-and-swap."""

from __future__ import annotations

import click

from catalog.cli.common import connect, json_option, parse_expect, parse_name, server_option
from catalog.cli.output import emit_json, format_time, print_table
from catalog.cli.shapes import move_doc
from catalog.model import AliasMove


def _describe(move: AliasMove) -> str:
    before = move.previous or "-"
    after = move.revision or "removed"
    return f"{move.adapter}@{move.alias}: {before} -> {after}"


@click.group()
def alias() -> None:
    """Move, remove and inspect aliases (moves are compare-and-swap)."""


@alias.command("set")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.argument("target", metavar="REVISION")
@click.option(
    "--expect", default=None, help="Revision the alias must point at now ('none': unset)."
)
@server_option
@json_option
def alias_set(
    name: str, alias_name: str, target: str, expect: str | None, server: str, as_json: bool
) -> None:
    """Point ALIAS of NAME at REVISION: a number (3), another alias (canary, latest) or a
    digest (sha256:<hex>, a unique prefix of 12+ hex digits)."""
    with connect(server) as client:
        move = client.set_alias(parse_name(name), alias_name, target, expected=parse_expect(expect))
    if as_json:
        emit_json(move_doc(move))
    else:
        click.echo(_describe(move))


@alias.command("rm")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--expect", default=None, help="Revision the alias must point at now.")
@server_option
@json_option
def alias_rm(name: str, alias_name: str, expect: str | None, server: str, as_json: bool) -> None:
    """Remove ALIAS of NAME."""
    with connect(server) as client:
        move = client.set_alias(parse_name(name), alias_name, 0, expected=parse_expect(expect))
    if as_json:
        emit_json(move_doc(move))
    else:
        click.echo(_describe(move))


@alias.command("history")
@click.argument("name")
@click.argument("alias_name", metavar="[ALIAS]", required=False, default="")
@server_option
@json_option
def alias_history(name: str, alias_name: str, server: str, as_json: bool) -> None:
    """Every move of ALIAS (or of all aliases) of NAME, oldest first."""
    with connect(server) as client:
        moves = client.alias_history(parse_name(name), alias_name)
    if as_json:
        emit_json([move_doc(m) for m in moves])
        return
    print_table(
        ["at", "alias", "from", "to", "by"],
        [
            (
                format_time(m.at),
                m.alias,
                m.previous or "-",
                m.revision or "removed",
                m.principal or "anonymous",
            )
            for m in moves
        ],
    )


@click.command()
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--to", "to", default="", help="Go to this revision (number, alias or digest).")
@click.option("--expect", default=None, help="Revision the alias must point at now.")
@server_option
@json_option
def rollback(
    name: str, alias_name: str, to: str, expect: str | None, server: str, as_json: bool
) -> None:
    """Move ALIAS of NAME back one step of its history; repeated, it keeps walking back
    (3 -> 2 -> 1). With --to, move it to that revision instead."""
    with connect(server) as client:
        move = client.rollback(parse_name(name), alias_name, expected=parse_expect(expect), to=to)
    if as_json:
        emit_json(move_doc(move))
    else:
        click.echo(_describe(move))
