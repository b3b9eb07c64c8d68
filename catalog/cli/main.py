"""``loracat``: the storage admin CLI.

Client commands talk to a running catalog (``--server`` or ``$LORACAT_SERVER``; ``--timeout``)
through ``catalog.client`` only; ``serve`` runs one. Read commands take ``--json`` and then print
exactly one JSON document on stdout, in the shapes of ``catalog.cli.shapes``. Errors are one line
on stderr and the exit statuses of ``catalog.cli.exit_codes``.

The commands live in one module per area: ``serve``, ``revisions`` (push, ls, show, pull, rm,
meta), ``purge``, ``aliases`` (alias, rollback), ``admin`` (health, gc, verify, reindex,
checkpoint, stats, demo), ``cache`` (cache, prefetch) and ``plan`` (plan, trace).
"""

from __future__ import annotations

import click

from catalog.cli.admin import checkpoint, demo, gc, health, reindex, stats, verify
from catalog.cli.aliases import alias, rollback
from catalog.cli.cache import cache, prefetch
from catalog.cli.exit_codes import LoracatGroup
from catalog.cli.plan import plan, trace
from catalog.cli.purge import purge
from catalog.cli.revisions import ls, meta, pull, push, rm, show
from catalog.cli.serve import serve


@click.group(cls=LoracatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loracat")
def cli() -> None:
    """loracat: a catalog and tiered storage for millions of LoRA adapters."""


for command in (
    serve,
    health,
    push,
    ls,
    show,
    meta,
    alias,
    rollback,
    pull,
    rm,
    purge,  # catalog/cli/purge.py: `loracat purge NAME`
    gc,
    verify,
    reindex,
    checkpoint,
    stats,
    demo,
    cache,
    prefetch,
    plan,  # catalog/cli/plan.py: `loracat plan`, `plan calibrate`
    trace,  # catalog/cli/plan.py: `loracat trace export`
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="loracat")


if __name__ == "__main__":
    main()
