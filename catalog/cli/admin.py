"""`loracat gc | verify | reindex | checkpoint | stats | demo`: keeping a catalog healthy."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from catalog.cli.common import connect, json_option, server_option, transfer_timeout
from catalog.cli.exit_codes import DATA_LOSS
from catalog.cli.output import emit_json, format_bytes, print_fields, print_table
from catalog.errors import Unavailable


@click.command()
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Keep trying this many seconds (for a catalog that is starting).",
)
@server_option
def health(wait: float, server: str) -> None:
    """Check that the catalog answers (exit 0), else exit 6: for scripts that start one."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with connect(server) as client:
                client.wait_ready(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                client.stats()
            break
        except Unavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
    click.echo(f"serving at {client.target}")


@click.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted and freed.")
@server_option
@json_option
def gc(dry_run: bool, server: str, as_json: bool) -> None:
    """Delete pack blobs that no live revision references."""
    with connect(server) as client:
        result = client.gc(dry_run=dry_run, timeout=transfer_timeout())
    if as_json:
        emit_json(result)
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {len(result['deleted'])} blob(s), {format_bytes(result['freed_bytes'])}; "
        f"kept {result['kept']}"
    )
    if dry_run:
        for digest in result["deleted"]:
            click.echo(f"  {digest}")


@click.command()
@server_option
@json_option
def verify(server: str, as_json: bool) -> None:
    """Check every log event and every referenced pack blob against its digest (exit 8 when
    something is wrong)."""
    with connect(server) as client:
        result = client.verify(timeout=transfer_timeout())
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"checked {result['checked_blobs']} blob(s) and {result['checked_events']} event(s): "
            f"{len(result['problems'])} problem(s)"
        )
        for problem in result["problems"]:
            click.echo(f"  {problem}")
    if result["problems"]:
        sys.exit(DATA_LOSS)


@click.command()
@server_option
@json_option
def reindex(server: str, as_json: bool) -> None:
    """Rebuild the server's index from the durable store alone and swap it in."""
    with connect(server) as client:
        result = client.reindex(timeout=transfer_timeout())
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"reindexed {result['adapters']} adapter(s), {result['revisions']} revision(s) "
            f"from {result['events']} event(s) in {result['seconds']:.2f}s"
        )


@click.command()
@click.option(
    "--keep", default=2, show_default=True, type=click.IntRange(1), help="Checkpoints kept."
)
@server_option
@json_option
def checkpoint(keep: int, server: str, as_json: bool) -> None:
    """Fold the durable log into a checkpoint so the next reindex reads it plus the tail."""
    with connect(server) as client:
        result = client.checkpoint(keep=keep, timeout=transfer_timeout())
    if as_json:
        emit_json(result)
    elif result["written"]:
        click.echo(
            f"wrote {result['name']}: {result['events']} event(s) ({result['new_events']} new), "
            f"{format_bytes(result['size_bytes'])} in {result['seconds']:.2f}s"
        )
    else:
        click.echo(f"nothing new since {result['previous'] or result['name']}")


@click.command()
@server_option
@json_option
def stats(server: str, as_json: bool) -> None:
    """Catalog and tier statistics."""
    with connect(server) as client:
        result = client.stats()
    if as_json:
        emit_json(result)
        return
    print_fields(
        [
            ("store", result["store_url"]),
            ("adapters", result["adapters"]),
            ("revisions", result["revisions"]),
            ("aliases", result["aliases"]),
            ("index", format_bytes(result["index_bytes"])),
            ("engines", result["engines"]),
        ]
    )
    if result["tiers"]:
        print_table(
            ["tier", "entries", "bytes", "hits", "misses", "evictions"],
            [
                (
                    t["tier"],
                    t["entries"],
                    format_bytes(t["bytes"]),
                    t["hits"],
                    t["misses"],
                    t["evictions"],
                )
                for t in result["tiers"]
            ],
        )


@click.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the catalog here (default: a temporary directory, removed after).",
)
@click.option("--adapters", default=48, show_default=True, type=click.IntRange(1))
@click.option("--slots", "num_slots", default=8, show_default=True, type=click.IntRange(2))
@click.option("--waves", default=4, show_default=True, type=click.IntRange(1))
@click.option(
    "--auth",
    is_flag=True,
    help="Serve with tokens: the trainer pushes as a write principal, the engine as an engine one.",
)
def demo(root: Path | None, adapters: int, num_slots: int, waves: int, auth: bool) -> None:
    """Run the whole system end to end on this machine (catalog, gRPC, resident engine)."""
    # The engine side needs torch; it is imported only here, so catalog/ itself never does.
    from engine_plugin.demo import run_demo

    run_demo(root=root, adapters=adapters, num_slots=num_slots, waves=waves, auth=auth)
