"""`loracat push | ls | show | pull | rm | meta`: revisions, their listing and their metadata."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

from catalog.atomic_files import write_atomically
from catalog.cli.common import (
    connect,
    json_option,
    parse_name,
    server_option,
    transfer_timeout,
)
from catalog.cli.output import (
    emit_json,
    format_bytes,
    format_time,
    print_fields,
    print_table,
    transfer_progress,
)
from catalog.cli.shapes import adapter_doc, revision_doc
from catalog.errors import FailedPrecondition, InvalidArgument, InvalidPack
from catalog.model import PushProvenance, Ref, Revision
from catalog.revision_metadata import DESCRIPTION_KEY, MODEL_CARD_KEY

MODEL_CARD_FILE = "README.md"
PEFT_CONFIG_FILE = "adapter_config.json"


def parse_pairs(items: tuple[str, ...], option: str) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict. Raises ``InvalidArgument`` naming the option."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _peft_config_base(src: Path) -> str:
    try:
        config = json.loads((src / PEFT_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return ""  # import_peft_dir reports a missing or malformed config precisely
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) else ""


def check_peft_base(src: Path, base_id: str | None) -> None:
    """Refuse ``--base`` when the PEFT adapter directory ``src`` names another base: never
    relabelled (the server refuses it too, with the same status). Raises ``InvalidArgument``."""
    stated = _peft_config_base(src)
    if base_id and stated and stated != base_id:
        raise InvalidArgument(
            f"{src}: the adapter was trained for base {stated!r} "
            f"({PEFT_CONFIG_FILE} base_model_name_or_path), not {base_id!r}; "
            "push it without --base, or with the base it names"
        )


def load_pack_bytes(src: Path, base_id: str | None) -> bytes:
    """Pack bytes from a PEFT adapter directory or a pack file.

    ``base_id`` (``--base``) names the base when the adapter names none; when the adapter names
    another base it is refused, never relabelled (the server refuses it too, with the same
    status). Raises ``InvalidArgument`` (no such source, another base), ``InvalidPack``
    (malformed, or no base at all).
    """
    from catalog.pack import import_peft_dir, read_pack, write_pack

    if src.is_dir():
        check_peft_base(src, base_id)
        return import_peft_dir(src, base_id=base_id or None)
    if not src.exists():
        raise InvalidArgument(f"{src}: no such file or directory")
    data = src.read_bytes()
    pack = read_pack(data)
    stated = pack.manifest.base_id
    if base_id and stated and stated != base_id:
        raise InvalidArgument(
            f"{src}: the pack was built for base {stated!r}, not {base_id!r}; "
            "push it without --base, or with the base it names"
        )
    if base_id and not stated:
        tensors = {name: pack.tensor(name) for name in pack.tensor_names()}
        return write_pack(pack.manifest.with_base_id(base_id), tensors)
    if not stated:
        raise InvalidPack(f"{src}: the pack names no base_id; pass --base")
    return data


def read_model_card(src: Path) -> str | None:
    """The adapter directory's ``README.md`` (its model card), if it has one."""
    card = src / MODEL_CARD_FILE
    if not src.is_dir() or not card.is_file():
        return None
    try:
        return card.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{card}: the model card is not UTF-8 text") from None


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("name")
@click.option("--alias", "aliases", multiple=True, help="Alias to point at it (repeatable).")
@click.option("--base", "base_id", default=None, help="Base model the adapter was trained for.")
@click.option("--meta", "meta", multiple=True, help="Metadata (a tag) KEY=VALUE (repeatable).")
@click.option("--description", default=None, help="One line about this revision.")
@click.option("--run-id", default="", help="Provenance: the training run that made it.")
@click.option("--parent", default="", help="Provenance: the revision it was trained from (REF).")
@click.option("--data-digest", default="", help="Provenance: digest of the training data.")
@click.option("--eval", "evals", multiple=True, help="Evaluation result KEY=VALUE (repeatable).")
@server_option
@json_option
def push(
    src: Path,
    name: str,
    aliases: tuple[str, ...],
    base_id: str | None,
    meta: tuple[str, ...],
    description: str | None,
    run_id: str,
    parent: str,
    data_digest: str,
    evals: tuple[str, ...],
    server: str,
    as_json: bool,
) -> None:
    """Push SRC (a PEFT adapter dir or a pack file) as a new revision of NAME (tenant/name).

    A README.md in SRC is kept as the revision's model card (and written back by `pull`).
    """
    adapter = parse_name(name)
    metadata = parse_pairs(meta, "--meta")
    if description is not None:
        metadata[DESCRIPTION_KEY] = description
    card = read_model_card(src)
    if card is not None:
        metadata[MODEL_CARD_KEY] = card
    provenance = PushProvenance(
        run_id=run_id,
        parent=str(Ref.parse(parent)) if parent else "",
        data_digest=data_digest,
        eval=parse_pairs(evals, "--eval"),
    )
    options: dict[str, Any] = dict(
        base_id=base_id or "", aliases=aliases, metadata=metadata, provenance=provenance
    )
    if src.is_dir():  # imported straight into the catalog's inbox when it is on this host
        check_peft_base(src, base_id)
        with connect(server) as client, transfer_progress(f"push {adapter}") as progress:
            result = client.push_peft_dir(
                adapter, src, progress=progress, timeout=transfer_timeout(), **options
            )
    else:
        data = load_pack_bytes(src, base_id)
        with connect(server) as client, transfer_progress(f"push {adapter}") as progress:
            result = client.push(
                adapter, data, progress=progress, timeout=transfer_timeout(), **options
            )
    revision: Revision = result.revision
    if as_json:
        emit_json({**revision_doc(revision), "created": result.created})
        return
    verb = "pushed" if result.created else "unchanged (identical revision exists):"
    click.echo(f"{verb} {revision.adapter}@{revision.number} {revision.digest}")


@click.command("ls")
@click.argument("prefix", required=False, default="")
@click.option("--revisions", is_flag=True, help="List the revisions of one adapter (tenant/name).")
@click.option("--base", "base_id", default="", help="Only adapters whose latest is for this base.")
@click.option("--tag", "tags", multiple=True, help="Only adapters whose latest has KEY=VALUE.")
@click.option("--alias", "alias_name", default="", help="Only adapters with this alias set.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many.")
@click.option("--page-token", default="", help="Continue a listing where --limit stopped.")
@server_option
@json_option
def ls(
    prefix: str,
    revisions: bool,
    base_id: str,
    tags: tuple[str, ...],
    alias_name: str,
    limit: int | None,
    page_token: str,
    server: str,
    as_json: bool,
) -> None:
    """List adapters (all, one tenant's, or one adapter's), filtered by the catalog's index.

    With --limit, the token to continue from is printed on stderr (text) or returned as
    next_page_token (JSON).
    """
    filters = {"base_id": base_id, "tags": parse_pairs(tags, "--tag"), "alias": alias_name}
    if revisions:
        if any((base_id, tags, alias_name, limit, page_token)):
            raise InvalidArgument("--revisions lists one adapter: it takes no filters or paging")
        _ls_revisions(prefix, server, as_json)
        return
    with connect(server) as client:
        if limit is None and not page_token:
            adapters = list(client.iter_adapters(prefix, **filters))
            token = ""
        else:
            adapters, token = [], page_token
            wanted = limit or 1000
            while len(adapters) < wanted:
                page = client.list_adapters(
                    prefix,
                    page_size=min(wanted - len(adapters), 1000),
                    page_token=token,
                    **filters,
                )
                adapters.extend(page.items)
                token = page.next_token
                if not token:
                    break
    if as_json:
        emit_json(
            {"adapters": [adapter_doc(a) for a in adapters], "next_page_token": token or None}
        )
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
    if token:
        click.echo(f"more: --page-token {token}", err=True)


def _ls_revisions(name: str, server: str, as_json: bool) -> None:
    with connect(server) as client:
        revs = list(client.iter_revisions(parse_name(name)))
    if as_json:
        emit_json({"revisions": [revision_doc(r) for r in revs], "next_page_token": None})
        return
    print_table(
        ["revision", "digest", "rank", "size", "aliases", "created", "description"],
        [
            (
                r.number,
                r.digest.short,
                r.rank,
                format_bytes(r.size_bytes),
                ",".join(r.aliases),
                format_time(r.created_at),
                r.metadata.get(DESCRIPTION_KEY, ""),
            )
            for r in revs
        ],
    )


@click.command()
@click.argument("ref")
@server_option
@json_option
def show(ref: str, server: str, as_json: bool) -> None:
    """Show the revision REF names (t/n, t/n@7, t/n@serving, t/n@sha256:...)."""
    with connect(server) as client:
        revision = client.resolve(Ref.parse(ref))
    if as_json:
        emit_json(revision_doc(revision))
        return
    doc = revision.to_json()
    metadata = dict(doc["metadata"])
    card = metadata.pop(MODEL_CARD_KEY, None)
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
            *(
                [("model_card", f"{len(card.encode())} bytes (README.md on pull)")]
                if card is not None
                else []
            ),
            *((f"meta.{k}", v) for k, v in sorted(metadata.items())),
        ]
    )


def _claim_destination(dest: Path, force: bool) -> None:
    """Refuse to write over something at ``dest`` unless ``force``."""
    if dest.is_dir() and not any(dest.iterdir()):
        return
    if _is_stream(dest):
        return
    if dest.exists() and not force:
        kind = "folder" if dest.is_dir() else "file"
        raise FailedPrecondition(
            f"{dest}: the {kind} exists and is not empty; pull into a new or empty folder, "
            "or pass --force to replace it"
        )


def _is_stream(path: Path) -> bool:
    """A device or pipe (``/dev/null``, ``/dev/stdout``): written into, never replaced."""
    return path.exists() and not path.is_file() and not path.is_dir()


def _replace_dir(staged: Path, dest: Path) -> None:
    """Move ``staged`` to ``dest``, replacing what is there; never a half-written ``dest``."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists() and not dest.is_symlink():
        staged.rename(dest)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    retired.rmdir()
    dest.rename(retired)
    staged.rename(dest)
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired)
    else:
        retired.unlink()


@click.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--format", "fmt", type=click.Choice(["peft", "pack"]), default="peft", show_default=True
)
@click.option("--force", is_flag=True, help="Replace what DEST holds.")
@server_option
def pull(ref: str, dest: Path, fmt: str, force: bool, server: str) -> None:
    """Download REF to DEST as a PEFT adapter directory (with its README.md model card) or a
    pack file. DEST must be new or empty unless --force; it is written whole or not at all."""
    parsed = Ref.parse(ref)
    if fmt == "peft" or not dest.is_dir():  # checked before the transfer, again after it
        _claim_destination(dest, force)
    with connect(server) as client, transfer_progress(f"pull {parsed}") as progress:
        revision, data = client.fetch_with_revision(
            parsed, progress=progress, timeout=transfer_timeout()
        )
    if fmt == "pack":
        target = dest / f"{revision.adapter.name}-{revision.number}.pack" if dest.is_dir() else dest
        _claim_destination(target, force)
        if _is_stream(target):
            with open(target, "wb") as stream:
                stream.write(data)
        else:
            # No fsync (none before either): a pulled copy of a pack the catalog keeps durably.
            write_atomically(target, data, fsync=False)
    else:
        from catalog.pack import export_peft_dir

        target = dest
        dest.absolute().parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.absolute().parent))
        try:
            export_peft_dir(data, staged)
            card = revision.metadata.get(MODEL_CARD_KEY)
            if card is not None:
                (staged / MODEL_CARD_FILE).write_text(card, encoding="utf-8")
            _replace_dir(staged, dest)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    click.echo(f"pulled {revision.adapter}@{revision.number} {revision.digest} -> {target}")


@click.command()
@click.argument("ref")
@click.option("--all", "all_revisions", is_flag=True, help="Delete every revision of the adapter.")
@click.option("--force", is_flag=True, help="With --all: remove the adapter's aliases first.")
@server_option
@json_option
def rm(ref: str, all_revisions: bool, force: bool, server: str, as_json: bool) -> None:
    """Delete the revision REF names (pack bytes are freed by `loracat gc`).

    A revision an alias points at is refused (exit 5), with --all too, unless --all --force.
    """
    if force and not all_revisions:
        raise InvalidArgument("--force goes with --all; move the alias to delete one revision")
    parsed = Ref.parse(ref)
    with connect(server) as client:
        deleted = client.delete(parsed, all_revisions=all_revisions, force=force)
    if as_json:
        emit_json({"name": str(parsed.adapter), "deleted": deleted})
        return
    click.echo(f"deleted {parsed.adapter} revision(s) {', '.join(map(str, deleted))}")


@click.group()
def meta() -> None:
    """Edit a revision's metadata: a description, tags, eval results."""


@meta.command("set")
@click.argument("ref")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@server_option
@json_option
def meta_set(ref: str, pairs: tuple[str, ...], server: str, as_json: bool) -> None:
    """Set metadata of the revision REF names (description=..., any tag, eval.KEY=...)."""
    values = parse_pairs(pairs, "meta set")
    with connect(server) as client:
        revision = client.set_metadata(Ref.parse(ref), values)
    _print_metadata(revision, as_json)


@meta.command("rm")
@click.argument("ref")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@server_option
@json_option
def meta_rm(ref: str, keys: tuple[str, ...], server: str, as_json: bool) -> None:
    """Remove metadata keys of the revision REF names (absent keys are ignored)."""
    with connect(server) as client:
        revision = client.set_metadata(Ref.parse(ref), remove=list(keys))
    _print_metadata(revision, as_json)


def _print_metadata(revision: Revision, as_json: bool) -> None:
    if as_json:
        emit_json(revision_doc(revision))
        return
    click.echo(f"{revision.adapter}@{revision.number}")
    shown = {k: v for k, v in revision.metadata.items() if k != MODEL_CARD_KEY}
    if shown:
        print_fields(sorted(shown.items()))
