"""How long after a trainer has a new revision can the engine serve it: adapter vs full model?

MinT's headline measurement (adapter-only handoff 18.3x faster than a full reload at 4B), on a
Qwen2-0.5B-shaped bf16 base (random weights; nothing is downloaded), ranks 1, 16 and 64 on all
seven linear modules. Trainer and engine share only the durable tier:

- **full path**: the trainer serializes the merged checkpoint (safetensors, in memory) and
  uploads it to the bucket the catalog uses; the engine downloads it and copies every tensor
  into the parameters of its resident model in place (zero-copy parse, one ``copy_`` each),
  after which the weights are resident and usable. The merge itself is timed separately and
  *not* counted (a conservative choice: it only makes the full path look faster).
- **adapter path**: the trainer turns its PEFT directory into a pack and pushes it to the
  catalog server, one SDK call (``CatalogClient.push_peft_dir``: on the catalog's host the pack
  is written straight into the catalog's push inbox and named in one RPC; elsewhere imported
  and streamed over gRPC; the server writes it to the bucket). Export and push are therefore
  one column, "export+upload" (the full path's serialize + upload beside it); the call's
  parts (laying the pack out, writing the inbox file, the RPC with the catalog's hash, fsync,
  checks and commit) are printed for rank 16. The engine runs ``engine.attach(ref)``
  (resolve, fetch from the catalog, which reads the bucket, stage in host memory, copy into a
  slot) until the adapter is usable. Every run is a new revision (new bytes), so no cache on
  the way holds it.

Two settings: **S3** (a SeaweedFS server started here; the catalog's durable store and the
checkpoint under one bucket) and **colocated** (the catalog a ``loracat serve`` process on a
local ``file://`` store with its default fsync, the engine beside it reading packs straight
from its NVMe tier (``catalog.client.colocated``), the checkpoint on a local store without
fsync, page cache warm: the full path at memory speed, so the ratio is naturally lower). The
colocated catalog runs with its default warm inbox files (``catalog.warm_inbox``: the push
writes over a file whose pages the catalog cached after the previous push);
``--cold-inbox`` serves with none (``--push-warm-files 0``), each push writing a new file,
and writes its JSON beside (``*_cold_inbox``). The per-run r16 table says which pushes
found a warm file.
Warm-up runs first, then ``--runs`` timed runs, medians. Reports every component
(export+upload, download, copy), the ratio and the bytes ratio (its ceiling). Floors: S3 ratio
>= 25x at rank 16 (issue 3); colocated >= 40x at rank 16 (issue 14).

Bench hygiene (both paths alike, never part of what is timed): before every timed step of
either path (each full-path run, each adapter push) the bench calls ``os.sync()`` and waits
for it, so that no path pays for the disk writeback another step left behind (the full path
writes ~1 GB of checkpoints without fsync; on the 2-core VM single pushes that ran into that
writeback took 80-190 ms instead of 33-44). ``--no-settle`` leaves it out. The dirty and
writeback page-cache sizes (``/proc/meminfo``) before each step are kept in the JSON. The
adapter path's runs are ``--gap-s`` apart (default 1 s, untimed): a trainer hands off a revision
per training step, not one every few milliseconds, and the catalog's warm inbox is refilled
in the quiet after a push (``catalog.warm_inbox.QUIET_S``); with ``--gap-s 0`` pushes come
back to back and only the first ones find a warm file.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_handoff.py [--runs 5] [--small] \
        [--settings colocated] [--cold-inbox]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_mixed_batch import (
    ALL_LINEARS,
    BASE_ID,
    build_base,
    linear_shapes,
    qwen2_05b_config,
    write_peft_adapter,
)
from bench.common import (
    add_device_argument,
    device_info,
    print_table,
    synchronizer,
    write_results,
)
from catalog.storage import open_store
from catalog.testing.seaweedfs import SeaweedFS

RANKS = (1, 16, 64)
BUCKET = "loracat-bench"


def merged_state(base: Any, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The trainer's merged checkpoint: base weights with ``W += s * B @ A`` for every module."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    if getattr(base.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # one tensor, saved once (as transformers does)
    prefix = "base_model.model."
    for key, a in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(prefix) : -len(".lora_A.weight")]
        b = lora[key.replace("lora_A", "lora_B")]
        weight = state[f"{module}.weight"]
        weight += (scaling * (b.float() @ a.float())).to(weight.dtype)
    return state


def load_in_place(model: Any, checkpoint: bytes) -> int:
    """Copy every tensor of a safetensors checkpoint into ``model``'s existing parameters."""
    from catalog.pack.container import parse_safetensors
    from engine_plugin.staging import tensor_from_bytes

    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    parsed = parse_safetensors(checkpoint)
    moved = 0
    with torch.no_grad():
        for name, tb in parsed.tensors.items():
            source = tensor_from_bytes(tb)
            targets[name].copy_(source)
            moved += tb.data.nbytes
    return moved


#: ``--cold-inbox``: the colocated catalog keeps no warm inbox files (``loracat serve
#: --push-warm-files 0``), so each push writes a new inbox file as before issue 14's warm files.
COLD_INBOX = False


@contextmanager
def catalog_server(root: Path, store_url: str, *, process: bool = False) -> Iterator[str]:
    """A catalog serving ``store_url``: in this process, or (``process``) a ``loracat serve``
    child, as on a node where engines beside the catalog read its NVMe tier directly (with
    its default warm inbox files, or none with ``--cold-inbox``)."""
    from catalog.service.server import create_server, open_catalog

    if process:
        from tests.servers import serve_subprocess

        extra = ["--push-warm-files", "0"] if COLD_INBOX else []
        with serve_subprocess(root, store_url, extra_args=extra) as (_, address):
            yield address
        return
    catalog = open_catalog(root, store_url)
    server, port = create_server(catalog, "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()
        catalog.close()


#: Where the engine (and the full path's resident model) runs: ``--device``.
DEVICE = "cpu"


#: Sync the disk before each timed step (``--no-settle``: don't); see the module doc.
SETTLE = True
#: Seconds between two runs of the adapter path (``--gap-s``; untimed): the trainer's step.
GAP_S = 1.0


def settle() -> dict[str, float]:
    """Bench hygiene before a timed step (untimed): ``os.sync()`` unless ``--no-settle``; the
    page cache's dirty and writeback MB as they were before it."""
    meminfo = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Dirty", "Writeback"):
                meminfo[f"{key.lower()}_mb"] = int(rest.split()[0]) / 1024
    if SETTLE:
        os.sync()
    return meminfo


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn`` takes, the device's queue drained after it (so copies it queued count)."""
    sync = synchronizer(DEVICE)
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def run_setting(
    label: str,
    catalog_url: str,
    checkpoint_store: Any,
    base: Any,
    checkpoint: bytes,
    adapter_dirs: dict[int, list[Path]],
    root: Path,
    warmup: int,
) -> dict[str, Any]:
    from catalog.client import CatalogClient
    from engine_plugin import ResidentEngine

    result: dict[str, Any] = {"full": [], "adapter": {}}
    # the engine process's resident model for the full path
    resident = copy.deepcopy(base).to(DEVICE)
    print(f"[{label}] full path ...", flush=True)
    for run in range(len(adapter_dirs[RANKS[0]])):  # warm-up runs included
        key = f"checkpoints/run-{run}-{uuid.uuid4().hex[:8]}.safetensors"
        before = settle()
        upload_s, _ = timed(lambda key=key: checkpoint_store.put(key, checkpoint))
        download_s, got = timed(lambda key=key: checkpoint_store.get(key))
        copy_s, _ = timed(lambda got=got, model=resident: load_in_place(model, got))
        checkpoint_store.delete(key)
        if run >= warmup:
            result["full"].append(
                {"upload_s": upload_s, "download_s": download_s, "copy_s": copy_s, **before}
            )
    del resident

    colocated = label == "colocated"
    with catalog_server(root / f"catalog-{label}", catalog_url, process=colocated) as address:
        client = CatalogClient(address)
        engine = ResidentEngine(
            copy.deepcopy(base),
            catalog=client,
            num_slots=4,
            max_rank=max(RANKS),
            base_id=BASE_ID,
            host_budget_bytes=2 << 30,
            device=DEVICE,
        )
        try:
            for rank, dirs in adapter_dirs.items():
                print(f"[{label}] adapter path, rank {rank} ...", flush=True)
                runs = []
                name = f"bench/handoff-r{rank}"
                inbox = client.push_inbox
                for run, directory in enumerate(dirs):
                    if run:
                        time.sleep(GAP_S)
                    meminfo = settle()
                    pushing = dict(inbox.timings) if inbox else {}
                    warm_before = inbox.counters["warm"] if inbox else 0
                    export_push_s, pushed = timed(
                        lambda d=directory, n=name: client.push_peft_dir(n, d, base_id=BASE_ID)
                    )
                    pushed_in = {key: inbox.timings[key] - pushing[key] for key in pushing if inbox}
                    # whether the push wrote over a warm inbox file (catalog.warm_inbox)
                    warm = bool(inbox and inbox.counters["warm"] > warm_before)
                    before = dict(engine.timings)
                    attach_s, revision = timed(lambda n=name: engine.attach(n))
                    after = engine.timings
                    if revision.digest != pushed.revision.digest:
                        raise RuntimeError("engine attached another revision than was pushed")
                    fetch_s = after["fetch_s"] - before["fetch_s"]
                    stage_s = after["stage_s"] - before["stage_s"]
                    slot_copy_s = after["copy_s"] - before["copy_s"]
                    if run >= warmup:
                        inbox_s = sum(pushed_in.values())
                        runs.append(
                            {
                                "pack_bytes": pushed.revision.size_bytes,
                                "export_push_s": export_push_s,
                                # through the inbox: laying the pack out (the rest of the
                                # call), writing the inbox file, the RPC
                                "plan_s": export_push_s - inbox_s if pushed_in else 0.0,
                                "inbox_write_s": pushed_in.get("write_s", 0.0),
                                "push_rpc_s": pushed_in.get("rpc_s", 0.0),
                                "warm_inbox": warm,
                                "attach_s": attach_s,
                                "fetch_s": fetch_s,
                                "stage_s": stage_s,
                                "slot_copy_s": slot_copy_s,
                                "attach_other_s": attach_s - fetch_s - stage_s - slot_copy_s,
                                **meminfo,
                            }
                        )
                # the adapter is usable: one forward on it
                engine.forward(torch.zeros(1, 4, dtype=torch.long, device=DEVICE), [name])
                result["adapter"][str(rank)] = runs
            path = client.colocated
            result["colocated_reads"] = 0 if path is None else path.counters["reads"]
            if colocated and (path is None or path.reason or path.counters["fallbacks"]):
                raise RuntimeError(f"the colocated engine streamed: {path and path.reason}")
        finally:
            engine.close()
            client.close()
    return result


def summarize(result: dict[str, Any], export_full_s: float, ckpt_bytes: int) -> dict[str, Any]:
    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    full = {
        "export_s": export_full_s,
        "upload_s": med(result["full"], "upload_s"),
        "download_s": med(result["full"], "download_s"),
        "copy_s": med(result["full"], "copy_s"),
        "bytes": ckpt_bytes,
    }
    full["export_upload_s"] = full["export_s"] + full["upload_s"]
    full["total_s"] = statistics.median(
        export_full_s + r["upload_s"] + r["download_s"] + r["copy_s"] for r in result["full"]
    )
    adapters = {}
    for rank, rows in result["adapter"].items():
        total = statistics.median(r["export_push_s"] + r["attach_s"] for r in rows)
        summary = {
            key: med(rows, key) for key in rows[0] if key not in ("pack_bytes", "warm_inbox")
        }
        summary["warm_inbox_runs"] = sum(bool(r.get("warm_inbox")) for r in rows)
        summary.update(
            {
                "bytes": rows[0]["pack_bytes"],
                "total_s": total,
                "export_upload_s": summary["export_push_s"],
                "download_s": summary["fetch_s"],
                "copy_s": summary["stage_s"] + summary["slot_copy_s"],
                "ratio": full["total_s"] / total,
                "bytes_ratio": ckpt_bytes / rows[0]["pack_bytes"],
            }
        )
        adapters[rank] = summary
    return {"full": full, "adapter": adapters}


HANDOFF_COLUMNS = [
    "setting",
    "path",
    "MiB",
    "export+upload ms",
    "download ms",
    "copy ms",
    "total ms",
    "speedup",
    "bytes ratio",
]


def run_settings(
    which: list[str],
    name: str,
    base: Any,
    checkpoint: bytes,
    adapter_dirs: dict[int, list[Path]],
    root: Path,
    warmup: int,
    export_full_s: float,
) -> dict[str, Any]:
    """Both settings of the handoff: over SeaweedFS S3 (started here) and colocated."""
    settings: dict[str, Any] = {}
    if "s3" in which:
        with SeaweedFS() as s3:
            s3.create_bucket(BUCKET)
            os.environ.update(s3.env())
            prefix = f"{name}-{uuid.uuid4().hex[:8]}"
            store = open_store(f"s3://{BUCKET}/{prefix}-checkpoints")
            raw = run_setting(
                "s3",
                f"s3://{BUCKET}/{prefix}-catalog",
                store,
                base,
                checkpoint,
                adapter_dirs,
                root,
                warmup,
            )
            store.close()
        settings["s3"] = {"raw": raw, **summarize(raw, export_full_s, len(checkpoint))}
    if "colocated" in which:
        store = open_store((root / "checkpoints").as_uri(), fsync=False)
        raw = run_setting(
            "colocated",
            (root / "catalog-store").as_uri(),
            store,
            base,
            checkpoint,
            adapter_dirs,
            root,
            warmup,
        )
        settings["colocated"] = {"raw": raw, **summarize(raw, export_full_s, len(checkpoint))}
    return settings


def handoff_rows(settings: dict[str, Any]) -> list[list[Any]]:
    """One table row for the full path and one per adapter rank, per setting."""
    table = []
    for label, summary in settings.items():
        full = summary["full"]
        table.append(
            [
                label,
                "full",
                full["bytes"] / 2**20,
                full["export_upload_s"] * 1e3,
                full["download_s"] * 1e3,
                full["copy_s"] * 1e3,
                full["total_s"] * 1e3,
                1.0,
                1.0,
            ]
        )
        for rank, adapter in summary["adapter"].items():
            table.append(
                [
                    label,
                    f"adapter r{rank}",
                    adapter["bytes"] / 2**20,
                    adapter["export_upload_s"] * 1e3,
                    adapter["download_s"] * 1e3,
                    adapter["copy_s"] * 1e3,
                    adapter["total_s"] * 1e3,
                    adapter["ratio"],
                    adapter["bytes_ratio"],
                ]
            )
    return table


def parse_handoff_args(description: str) -> argparse.Namespace:
    """The command line both handoff benchmarks take; sets torch's thread count from it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="a tiny model, for a quick check")
    parser.add_argument("--settings", nargs="+", default=["s3", "colocated"])
    parser.add_argument(
        "--no-settle", action="store_true", help="no os.sync() before each timed step"
    )
    parser.add_argument(
        "--cold-inbox",
        action="store_true",
        help="colocated: serve without warm inbox files (--push-warm-files 0)",
    )
    parser.add_argument(
        "--gap-s",
        type=float,
        default=1.0,
        help="seconds between two adapter-path runs (untimed; a trainer's step)",
    )
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, SETTLE, COLD_INBOX, GAP_S
    GAP_S = args.gap_s
    DEVICE = args.device
    SETTLE = not args.no_settle
    COLD_INBOX = args.cold_inbox
    return args


RUN_COLUMNS = [
    "setting",
    "run",
    "export+push ms",
    "plan ms",
    "inbox write ms",
    "warm",
    "push RPC ms",
    "attach ms",
    "total ms",
    "dirty MB",
    "writeback MB",
]


def run_rows(settings: dict[str, Any], rank: str = "16") -> list[list[Any]]:
    """Each timed run of the adapter path at ``rank``, its parts (a slow push shows here)."""
    rows = []
    for label, summary in settings.items():
        for i, r in enumerate(summary["raw"]["adapter"].get(rank, [])):
            rows.append(
                [
                    label,
                    i,
                    r["export_push_s"] * 1e3,
                    r["plan_s"] * 1e3,
                    r["inbox_write_s"] * 1e3,
                    "yes" if r.get("warm_inbox") else "no",
                    r["push_rpc_s"] * 1e3,
                    r["attach_s"] * 1e3,
                    (r["export_push_s"] + r["attach_s"]) * 1e3,
                    r.get("dirty_mb", 0.0),
                    r.get("writeback_mb", 0.0),
                ]
            )
    return rows


def main() -> None:
    args = parse_handoff_args(__doc__.split("\n")[0])

    from safetensors.torch import save

    config = qwen2_05b_config(args.small)
    print(f"building the base ({config.num_hidden_layers} layers, bf16) ...", flush=True)
    base = build_base(config)
    shapes = linear_shapes(base, ALL_LINEARS)
    root = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    print("writing the trainer's adapters ...", flush=True)
    adapter_dirs = {
        rank: [
            write_peft_adapter(
                root / "trainer" / f"r{rank}-{run}",
                shapes,
                config.num_hidden_layers,
                rank=rank,
                seed=rank * 1000 + run,
            )
            for run in range(args.warmup + args.runs)
        ]
        for rank in RANKS
    }
    merge_s, state = timed(lambda: merged_state(base, adapter_dirs[16][0]))
    exports = [timed(lambda s=state: save(s))[0] for _ in range(args.warmup + args.runs)]
    export_full_s = statistics.median(exports[args.warmup :])
    checkpoint = save(state)
    del state
    print(
        f"checkpoint {len(checkpoint) / 2**20:.0f} MiB: merge {merge_s:.2f}s (not counted), "
        f"serialize {export_full_s:.2f}s",
        flush=True,
    )

    try:
        settings = run_settings(
            args.settings,
            "handoff",
            base,
            checkpoint,
            adapter_dirs,
            root,
            args.warmup,
            export_full_s,
        )
    finally:  # ~1 GB of stores and checkpoints per run, in the shared machine's /tmp
        shutil.rmtree(root, ignore_errors=True)
    table = handoff_rows(settings)
    print_table(
        f"handoff: trainer has a revision -> engine serves it ({config.num_hidden_layers} layers, "
        f"bf16, medians of {args.runs})",
        HANDOFF_COLUMNS,
        table,
    )
    print_table(
        f"adapter path r16, each timed run (settle before each step: {SETTLE}; "
        f"warm inbox files: {'off' if COLD_INBOX else 'on'})",
        RUN_COLUMNS,
        run_rows(settings),
    )
    floors = {}
    if "s3" in settings:
        floors["s3_rank16_ratio_ge_25"] = settings["s3"]["adapter"]["16"]["ratio"] >= 25
    if "colocated" in settings and "16" in settings["colocated"]["adapter"]:
        ratio = settings["colocated"]["adapter"]["16"]["ratio"]
        floors["colocated_rank16_ratio_ge_40"] = ratio >= 40
    print("\nfloors:", floors)
    suffix = "" if args.device == "cpu" else "_cuda"
    # a colocated-only run keeps its own file (handoff.json holds the S3 setting's)
    only = "_colocated" if args.settings == ["colocated"] else ""
    only += "_cold_inbox" if args.cold_inbox else ""
    write_results(
        f"handoff{suffix}{only}{'_small' if args.small else ''}",
        {
            "device": device_info(args.device),
            "config": {
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "dtype": "bf16",
                "targets": list(ALL_LINEARS),
                "runs": args.runs,
                "warmup": args.warmup,
                "merge_s_not_counted": merge_s,
                "settle": SETTLE,
                "gap_s": GAP_S,
                "warm_inbox": not COLD_INBOX,
                "checkpoint_bytes": len(checkpoint),
            },
            "settings": settings,
            "floors_met": floors,
        },
    )


if __name__ == "__main__":
    main()
