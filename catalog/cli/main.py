"""``loracat``: the storage admin CLI.

Client commands talk to a running catalog (``--server HOST:PORT`` or ``$LORACAT_SERVER``) through
``catalog.client`` only; ``serve`` runs one. Read commands take ``--json`` and then print exactly
one JSON document on stdout. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from catalog.cli.cache import cache, prefetch
from catalog.cli.common import (
    connect,
    json_option,
    parse_bytes,
    parse_expect,
    parse_name,
    server_option,
)
from catalog.cli.output import (
    emit_json,
    format_bytes,
    format_time,
    print_fields,
    print_table,
    transfer_progress,
)
from catalog.cli.plan import plan
from catalog.errors import CatalogError, InvalidArgument, InvalidPack
from catalog.model import Ref, Revision

DEFAULT_ROOT = Path(os.environ.get("LORACAT_ROOT", Path.home() / ".loracat"))


class CatalogErrorsAsMessages(click.Group):
    """Turn catalog errors into one readable line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CatalogError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)


@click.group(cls=CatalogErrorsAsMessages, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loracat")
def cli() -> None:
    """loracat: a catalog and tiered storage for millions of LoRA adapters."""


# -- server --------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_ROOT,
    show_default=True,
    help="Directory for the LMDB index, spool and (by default) the file store.",
)
@click.option(
    "--store", "store_url", default=None, help="Durable store URL (file://..., s3://bucket/prefix)."
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7070, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="NVMe pack cache directory (default: ROOT/cache).",
)
@click.option(
    "--cache-bytes",
    default=str(8 << 30),
    show_default=True,
    help="NVMe pack cache budget in bytes (suffixes K, M, G, T; 0 disables the cache).",
)
@click.option(
    "--cache-policy",
    default="default",
    show_default=True,
    help="Eviction policy of the NVMe cache (see `loracat cache policies`).",
)
@click.option(
    "--metrics-port", default=None, type=click.IntRange(0, 65535), help="Serve Prometheus /metrics."
)
@click.option(
    "--max-workers",
    default=32,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Threads serving writes, fetches and other calls that may wait on the store "
    "(index reads run on the event loop).",
)
@click.option(
    "--max-hint-watchers",
    default=256,
    show_default=True,
    type=click.IntRange(0, 65536),
    help="Engines that may hold a WatchHints stream at once (each holds a thread).",
)
@click.option(
    "--digest",
    "digest_algorithm",
    type=click.Choice(["sha256", "blake3"]),
    default="sha256",
    show_default=True,
    help="Digest that identifies new revisions; every pack read is checked against it "
    "(blake3 hashes ~3x faster, which shows when fetching large packs).",
)
@click.option(
    "--auth",
    "auth_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML file of principals (token hashes, tenants, roles); SIGHUP reloads it.",
)
@click.option(
    "--audit-log", default=None, help="Write one JSON line per write-side call here ('-': stderr)."
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CA (PEM) that client certificates must be signed by: mutual TLS.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a non-loopback --host without --auth (anyone could then write).",
)
def serve(
    root: Path,
    store_url: str | None,
    host: str,
    port: int,
    cache_dir: Path | None,
    cache_bytes: str,
    cache_policy: str,
    metrics_port: int | None,
    max_workers: int,
    max_hint_watchers: int,
    digest_algorithm: str,
    auth_file: Path | None,
    audit_log: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    insecure: bool,
) -> None:
    """Run the catalog server."""
    import logging

    from catalog.cache.policies import resolve_policy_name
    from catalog.service.server import serve_forever

    resolve_policy_name(cache_policy)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve_forever(
        root,
        store_url,
        host=host,
        port=port,
        cache_dir=cache_dir,
        cache_bytes=parse_bytes(cache_bytes),
        cache_policy=cache_policy,
        metrics_port=metrics_port,
        max_workers=max_workers,
        max_hint_watchers=max_hint_watchers,
        digest_algorithm=digest_algorithm,
        auth_file=auth_file,
        audit_log=audit_log,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        insecure=insecure,
    )


# -- revisions -----------------------------------------------------------------------------


def load_pack_bytes(src: Path, base_id: str | None) -> bytes:
    """Pack bytes from a PEFT adapter directory or a pack file, with ``base_id`` applied."""
    from catalog.pack import import_peft_dir, read_pack, write_pack

    if src.is_dir():
        return import_peft_dir(src, base_id=base_id)
    if not src.exists():
        raise InvalidArgument(f"{src}: no such file or directory")
    data = src.read_bytes()
    pack = read_pack(data)
    if base_id and base_id != pack.manifest.base_id:
        tensors = {name: pack.tensor(name) for name in pack.tensor_names()}
        return write_pack(pack.manifest.with_base_id(base_id), tensors)
    if not pack.manifest.base_id:
        raise InvalidPack(f"{src}: the pack names no base_id; pass --base")
    return data


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("name")
@click.option(
    "--alias", "aliases", multiple=True, help="Alias to point at the new revision (repeatable)."
)
@click.option("--base", "base_id", default=None, help="Base model id the adapter was trained for.")
@click.option("--meta", "meta", multiple=True, help="Metadata KEY=VALUE (repeatable).")
@server_option
@json_option
def push(
    src: Path,
    name: str,
    aliases: tuple[str, ...],
    base_id: str | None,
    meta: tuple[str, ...],
    server: str,
    as_json: bool,
) -> None:
    """Push SRC (a PEFT adapter dir or a pack file) as a new revision of NAME (tenant/name)."""
    adapter = parse_name(name)
    metadata = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"--meta takes KEY=VALUE, got {item!r}")
        metadata[key] = value
    data = load_pack_bytes(src, base_id)
    with connect(server) as client, transfer_progress(f"push {adapter}") as progress:
        result = client.push(adapter, data, aliases=aliases, metadata=metadata, progress=progress)
    revision: Revision = result.revision
    if as_json:
        emit_json({**revision.to_json(), "created": result.created})
        return
    verb = "pushed" if result.created else "unchanged (identical revision exists):"
    click.echo(f"{verb} {revision.adapter}@{revision.number} {revision.digest}")


@cli.command("ls")
@click.argument("prefix", required=False, default="")
@click.option("--revisions", is_flag=True, help="List the revisions of one adapter (tenant/name).")
@server_option
@json_option
def ls(prefix: str, revisions: bool, server: str, as_json: bool) -> None:
    """List adapters (all, one tenant's, or one adapter's)."""
    with connect(server) as client:
        if revisions:
            revs = list(client.iter_revisions(parse_name(prefix)))
            if as_json:
                emit_json([r.to_json() for r in revs])
                return
            print_table(
                ["revision", "digest", "rank", "size", "aliases", "created"],
                [
                    (
                        r.number,
                        r.digest.short,
                        r.rank,
                        format_bytes(r.size_bytes),
                        ",".join(r.aliases),
                        format_time(r.created_at),
                    )
                    for r in revs
                ],
            )
            return
        adapters = list(client.iter_adapters(prefix))
    if as_json:
        emit_json([a.to_json() for a in adapters])
        return
    print_table(
        ["name", "latest", "revisions", "aliases", "updated"],
        [
            (
                a.adapter,
                a.latest or "-",
                a.revision_count,
                ",".join(f"{k}={v}" for k, v in sorted(a.aliases.items())),
                format_time(a.updated_at),
            )
            for a in adapters
        ],
    )


@cli.command()
@click.argument("ref")
@server_option
@json_option
def show(ref: str, server: str, as_json: bool) -> None:
    """Show the revision REF names (t/n, t/n@7, t/n@serving, t/n@sha256:...)."""
    with connect(server) as client:
        revision = client.resolve(Ref.parse(ref))
    if as_json:
        emit_json(revision.to_json())
        return
    doc = revision.to_json()
    print_fields(
        [
            ("name", doc["name"]),
            ("revision", doc["revision"]),
            ("digest", doc["digest"]),
            ("aliases", ", ".join(doc["aliases"]) or "-"),
            ("base_id", doc["base_id"]),
            ("rank", doc["rank"]),
            ("alpha", doc["alpha"]),
            ("dtype", doc["dtype"]),
            ("size_bytes", f"{doc['size_bytes']} ({format_bytes(doc['size_bytes'])})"),
            ("target_modules", ", ".join(doc["target_modules"])),
            ("layers", doc["num_layers"]),
            ("experts", doc["num_experts"]),
            ("created_at", format_time(doc["created_at"])),
            *((f"meta.{k}", v) for k, v in sorted(doc["metadata"].items())),
        ]
    )


@cli.group()
def alias() -> None:
    """Move, remove and inspect aliases (moves are compare-and-swap)."""


@alias.command("set")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.argument("revision", type=click.IntRange(1))
@click.option(
    "--expect", default=None, help="Revision the alias must point at now ('none': unset)."
)
@server_option
@json_option
def alias_set(
    name: str, alias_name: str, revision: int, expect: str | None, server: str, as_json: bool
) -> None:
    """Point ALIAS of NAME at REVISION."""
    with connect(server) as client:
        move = client.set_alias(
            parse_name(name), alias_name, revision, expected=parse_expect(expect)
        )
    if as_json:
        emit_json(move.to_json())
    else:
        click.echo(f"{move.adapter}@{move.alias}: {move.previous or '-'} -> {move.revision}")


@alias.command("rm")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--expect", default=None, help="Revision the alias must point at now.")
@server_option
def alias_rm(name: str, alias_name: str, expect: str | None, server: str) -> None:
    """Remove ALIAS of NAME."""
    with connect(server) as client:
        move = client.set_alias(parse_name(name), alias_name, 0, expected=parse_expect(expect))
    click.echo(f"{move.adapter}@{move.alias}: {move.previous} -> removed")


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
        emit_json([m.to_json() for m in moves])
        return
    print_table(
        ["at", "alias", "from", "to"],
        [(format_time(m.at), m.alias, m.previous or "-", m.revision or "removed") for m in moves],
    )


@cli.command()
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--expect", default=None, help="Revision the alias must point at now.")
@server_option
@json_option
def rollback(name: str, alias_name: str, expect: str | None, server: str, as_json: bool) -> None:
    """Move ALIAS of NAME back to where it pointed before its last move."""
    with connect(server) as client:
        move = client.rollback(parse_name(name), alias_name, expected=parse_expect(expect))
    if as_json:
        emit_json(move.to_json())
    else:
        click.echo(f"{move.adapter}@{move.alias}: {move.previous} -> {move.revision}")


@cli.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--format", "fmt", type=click.Choice(["peft", "pack"]), default="peft", show_default=True
)
@server_option
def pull(ref: str, dest: Path, fmt: str, server: str) -> None:
    """Download REF to DEST as a PEFT adapter directory or a pack file."""
    parsed = Ref.parse(ref)
    with connect(server) as client, transfer_progress(f"pull {parsed}") as progress:
        revision, data = client.fetch_with_revision(parsed, progress=progress)
    if fmt == "pack":
        target = dest / f"{revision.adapter.name}-{revision.number}.pack" if dest.is_dir() else dest
        tmp = target.with_name(f".{target.name}.partial")
        tmp.write_bytes(data)
        tmp.replace(target)
    else:
        from catalog.pack import export_peft_dir

        target = dest
        export_peft_dir(data, dest)
    click.echo(f"pulled {revision.adapter}@{revision.number} {revision.digest} -> {target}")


@cli.command()
@click.argument("ref")
@click.option("--all", "all_revisions", is_flag=True, help="Delete every revision of the adapter.")
@server_option
def rm(ref: str, all_revisions: bool, server: str) -> None:
    """Delete the revision REF names (pack bytes are freed by `loracat gc`)."""
    parsed = Ref.parse(ref)
    with connect(server) as client:
        deleted = client.delete(parsed, all_revisions=all_revisions)
    click.echo(f"deleted {parsed.adapter} revision(s) {', '.join(map(str, deleted))}")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@server_option
@json_option
def gc(dry_run: bool, server: str, as_json: bool) -> None:
    """Delete pack blobs that no live revision references."""
    with connect(server) as client:
        result = client.gc(dry_run=dry_run)
    if as_json:
        emit_json(result)
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {len(result['deleted'])} blob(s), {format_bytes(result['freed_bytes'])}; "
        f"kept {result['kept']}"
    )


@cli.command()
@server_option
@json_option
def verify(server: str, as_json: bool) -> None:
    """Check every log event and every referenced pack blob against its digest."""
    with connect(server) as client:
        result = client.verify()
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
        sys.exit(1)


@cli.command()
@server_option
@json_option
def reindex(server: str, as_json: bool) -> None:
    """Rebuild the server's index from the durable store alone and swap it in."""
    with connect(server) as client:
        result = client.reindex()
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"reindexed {result['adapters']} adapter(s), {result['revisions']} revision(s) "
            f"from {result['events']} event(s) in {result['seconds']:.2f}s"
        )


@cli.command()
@click.option(
    "--keep", default=2, show_default=True, type=click.IntRange(1), help="Checkpoints kept."
)
@server_option
@json_option
def checkpoint(keep: int, server: str, as_json: bool) -> None:
    """Fold the durable log into a checkpoint so the next reindex reads it plus the tail."""
    with connect(server) as client:
        result = client.checkpoint(keep=keep)
    if as_json:
        emit_json(result)
    elif result["written"]:
        click.echo(
            f"wrote {result['name']}: {result['events']} event(s) ({result['new_events']} new), "
            f"{format_bytes(result['size_bytes'])} in {result['seconds']:.2f}s"
        )
    else:
        click.echo(f"nothing new since {result['previous'] or result['name']}")


@cli.command()
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


@cli.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the catalog here (default: a temporary directory, removed after).",
)
@click.option("--adapters", default=48, show_default=True, type=click.IntRange(1))
@click.option("--slots", "num_slots", default=8, show_default=True, type=click.IntRange(2))
@click.option("--waves", default=4, show_default=True, type=click.IntRange(1))
def demo(root: Path | None, adapters: int, num_slots: int, waves: int) -> None:
    """Run the whole system end to end on this machine (catalog, gRPC, resident engine)."""
    # The engine side needs torch; it is imported only here, so catalog/ itself never does.
    from engine_plugin.demo import run_demo

    run_demo(root=root, adapters=adapters, num_slots=num_slots, waves=waves)


cli.add_command(cache)
cli.add_command(prefetch)
cli.add_command(plan)  # catalog/cli/plan.py: `loracat plan`, `plan calibrate`


def main() -> None:
    cli(prog_name="loracat")


if __name__ == "__main__":
    main()
