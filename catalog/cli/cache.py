"""`loracat cache ...` and `loracat prefetch`: the NVMe tier, and eviction-policy simulation."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from catalog.cli.common import (
    connect,
    json_option,
    parse_bytes,
    server_option,
    transfer_timeout,
)
from catalog.cli.output import emit_json, format_bytes, format_time, print_table
from catalog.cli.shapes import iso_time
from catalog.errors import InvalidArgument
from catalog.model import Ref

CACHE_ACTIONS = {"pin": "pinned", "unpin": "unpinned", "evict": "evicted"}


@click.group()
def cache() -> None:
    """Inspect and steer the catalog's NVMe pack cache, or simulate eviction policies."""


@cache.command("stats")
@server_option
@json_option
def cache_stats(server: str, as_json: bool) -> None:
    """Per-tier bytes, entries, hits, misses, evictions and bytes moved in and out (GPU and
    host summed over the engines' reports)."""
    with connect(server) as client:
        result = client.stats()
    if as_json:
        emit_json(
            {"tiers": {t["tier"]: t for t in result["tiers"]}, "counters": result["counters"]}
        )
        return
    print_table(
        ["tier", "entries", "bytes", "capacity", "hits", "misses", "evictions", "in", "out"],
        [
            (
                t["tier"],
                t["entries"],
                format_bytes(t["bytes"]),
                format_bytes(t["capacity_bytes"]) if t["capacity_bytes"] else "-",
                t["hits"],
                t["misses"],
                t["evictions"],
                format_bytes(t["bytes_in"]),
                format_bytes(t["bytes_out"]),
            )
            for t in result["tiers"]
        ],
    )


@cache.command("ls")
@server_option
@json_option
def cache_ls(server: str, as_json: bool) -> None:
    """Packs held in the NVMe cache."""
    with connect(server) as client:
        entries = client.list_cache()
    if as_json:
        emit_json([{**e, "inserted_at": iso_time(e["inserted_at"])} for e in entries])
        return
    print_table(
        ["digest", "size", "pins", "inserted"],
        [
            (
                e["digest"][:19],
                format_bytes(e["size_bytes"]),
                e["pins"],
                format_time(e["inserted_at"]),
            )
            for e in entries
        ],
    )


def _cache_action(action: str, ref: str, server: str) -> None:
    parsed = Ref.parse(ref)
    with connect(server) as client:
        revision = getattr(client, f"{action}_pack")(parsed)
    click.echo(f"{CACHE_ACTIONS[action]} {revision.adapter}@{revision.number} {revision.digest}")


@cache.command("pin")
@click.argument("ref")
@server_option
def cache_pin(ref: str, server: str) -> None:
    """Load REF's pack into the NVMe cache and keep it there."""
    _cache_action("pin", ref, server)


@cache.command("unpin")
@click.argument("ref")
@server_option
def cache_unpin(ref: str, server: str) -> None:
    """Drop one pin of REF's pack."""
    _cache_action("unpin", ref, server)


@cache.command("evict")
@click.argument("ref")
@server_option
def cache_evict(ref: str, server: str) -> None:
    """Remove REF's pack from the NVMe cache (the durable copy stays)."""
    _cache_action("evict", ref, server)


@cache.command("policies")
def cache_policies() -> None:
    """The eviction policies the cache and `simulate` know."""
    from catalog.cache.policies import DEFAULT_POLICY, POLICIES

    for name in POLICIES:
        click.echo(f"{name}{'  (default)' if name == DEFAULT_POLICY else ''}")


@cache.command("simulate")
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="One request per line: tenant/name@rev SIZE_BYTES.",
)
@click.option("--policy", default="default", show_default=True)
@click.option("--capacity-bytes", required=True, help="Cache size (bytes, or with K/M/G/T).")
@json_option
def cache_simulate(trace_path: Path, policy: str, capacity_bytes: str, as_json: bool) -> None:
    """Replay a request trace through a policy; compare with LRU and Belady's optimum."""
    from catalog.cache.replay import format_simulation, simulate

    if not trace_path.exists():
        raise InvalidArgument(f"{trace_path}: no such file")
    result = simulate(trace_path, policy, parse_bytes(capacity_bytes))
    if as_json:
        emit_json(result)
    else:
        click.echo(format_simulation(result))


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--priority", default=0, show_default=True, help="Higher runs first.")
@click.option("--deadline", default=0.0, show_default=True, help="Seconds; 0 for none.")
@server_option
@json_option
def prefetch(
    refs: tuple[str, ...], priority: int, deadline: float, server: str, as_json: bool
) -> None:
    """Warm the catalog's NVMe tier for REFS, showing each as it completes."""
    parsed = [str(Ref.parse(r)) for r in refs]
    results = []
    failed = False
    with connect(server) as client:
        for item in client.prefetch(
            parsed, priority=priority, deadline_s=deadline, timeout=transfer_timeout()
        ):
            failed |= item.state != "done"
            if as_json:
                results.append(
                    {
                        "ref": item.ref,
                        "state": item.state,
                        "digest": item.digest,
                        "size_bytes": item.size_bytes,
                        "error": item.error,
                    }
                )
            else:
                detail = format_bytes(item.size_bytes) if item.state == "done" else item.error
                click.echo(f"{item.state:9} {item.ref}  {detail}")
    if as_json:
        emit_json(results)
    if failed:
        sys.exit(1)
