"""`loracat purge NAME`: forget a name all of whose revisions are deleted."""

from __future__ import annotations

import click

from catalog.cli.common import connect, json_option, parse_name, server_option
from catalog.cli.output import emit_json
from catalog.errors import InvalidArgument


@click.command()
@click.argument("name")
@server_option
@json_option
def purge(name: str, server: str, as_json: bool) -> None:
    """Forget NAME (tenant/name) for good, after `loracat rm NAME --all`.

    Its aliases and alias history go, `ls` no longer shows it, and a later push of NAME starts
    a new adapter at revision 1. Refused (exit 5, naming them) while revisions are live; an
    unknown name exits 3. Pack bytes are freed by `loracat gc`.
    """
    if "@" in name:
        raise InvalidArgument(
            f"purge takes a name (tenant/name), not a revision: {name[:80]!r}; to delete a"
            " revision use `loracat rm`"
        )
    adapter = parse_name(name)
    with connect(server) as client:
        revisions = client.purge(adapter)
    if as_json:
        emit_json({"name": str(adapter), "purged": True, "revisions": revisions})
        return
    click.echo(f"purged {adapter} ({revisions} deleted revision(s) forgotten)")
