"""Dense attach through a colocated catalog vs attach from the engine's host tier (issue 14).

A Qwen2-0.5B-shaped bf16 base (random weights) in one ``ResidentEngine`` (8 slots of rank 64,
all seven linear modules) and a PEFT adapter per rank imported into a pack and pushed to a
``loracat serve`` child process on a ``file://`` store, its NVMe tier warm. Per rank, round by
round (interleaved, so load from other processes hits every variant alike), medians of
``--repeats`` rounds after warm-up; the adapter is detached (untimed) before every attach:

- ``host tier``: the pack is staged in the engine's host tier (by ``engine.prefetch``, untimed,
  before every attach); ``engine.attach(ref)`` is a resolve over gRPC plus the slot copy. The
  baseline of the floor.
- ``colocated catalog``: the staged copy is dropped first, so the attach fetches through a
  ``CatalogClient`` on the catalog's host: the pack read from the NVMe tier (here a reference
  entry: the ``file://`` store's file, mapped, every chunk checked; no lease for a resolved
  revision already in the tier, see ``catalog.client.colocated``), then the header (parsed
  once per digest), staging (views of the pack: format 2 stores ``lora_B`` in the slots'
  layout) and the slot copy. The reader keeps the file mapped between reads, so every round
  after the first is a repeated read of one kept map: every chunk is checked again, and the
  engine reuses the staging it made over that same map object (``engine_plugin.
  kept_stagings``: no parse, no staging). Floor: <= 1.5x ``host tier``.
- ``colocated, fresh map``: the same, with the reader's kept maps dropped first (so the
  engine's staging over the old map goes too): the first read of a pack by this process,
  which maps the file (faulting its pages in), parses the header and stages. Not the floor's
  figure; shown so that the kept map's share is visible.
- ``gRPC stream catalog``: the same with ``CatalogClient(..., colocated=False)``: the bytes
  streamed over loopback gRPC, as before issue 14.
- ``in-process bytes``: the same with an in-process source handing over the pack bytes it
  holds (no transfer at all): what validation, staging and the slot copy cost on their own.

The engine's own timers split each fetching attach into fetch, stage and slot copy. Prints a
table and writes ``bench/results/colocated_attach.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_colocated_attach.py [--repeats 15]
        [--ranks 1 16 64] [--small]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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
from bench.common import print_table, write_results

FLOOR = 1.5
VARIANTS = (
    "host tier",
    "colocated catalog",
    "colocated, fresh map",
    "gRPC stream catalog",
    "in-process bytes",
)


def measure_rank(
    engine: Any, sources: dict[str, Any], ref: str, repeats: int
) -> dict[str, dict[str, float]]:
    """Medians per variant: the attach, and the engine's fetch/stage/copy parts of it."""
    digest = str(sources["host tier"].resolve(ref).digest)

    def attach(variant: str) -> dict[str, float]:
        engine.detach(ref)
        engine.catalog = sources[variant]
        # A fetching attach leaves a staging that borrows the fetched bytes in the host tier
        # (see engine_plugin.staging); the baseline is what the prefetcher stages.
        engine.host.remove(digest)
        if variant == "host tier":
            engine.prefetch([ref])[0].result()
        if variant == "colocated, fresh map":
            sources[variant].colocated._reader.mapped.clear()
        before = dict(engine.timings)
        start = time.perf_counter()
        engine.attach(ref)
        elapsed = time.perf_counter() - start
        parts = {f"{k[:-2]}_ms": (engine.timings[k] - before[k]) * 1e3 for k in before}
        return {"attach_ms": elapsed * 1e3, **parts}

    engine.attach(ref)
    for variant in VARIANTS:  # warm-up: connections, the reader's map, code paths
        attach(variant)
        attach(variant)
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            samples[variant].append(attach(variant))
    engine.detach(ref)
    return {
        variant: {key: statistics.median(s[key] for s in rows) for key in rows[0]}
        for variant, rows in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--small", action="store_true", help="a tiny model, for a quick check")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from catalog.client import CatalogClient
    from catalog.pack import import_peft_dir
    from engine_plugin import LocalPackSource, ResidentEngine
    from tests.servers import serve_subprocess

    config = qwen2_05b_config(args.small)
    print(f"building the base ({config.num_hidden_layers} layers, bf16) ...", flush=True)
    base = build_base(config)
    shapes = linear_shapes(base, ALL_LINEARS)
    # Removed when the bench exits (its finalizer runs at exit): ~50 MB of store and tier.
    scratch = tempfile.TemporaryDirectory(prefix="bench-colocated-attach-")
    tmp = Path(scratch.name)
    packs = {
        rank: import_peft_dir(
            write_peft_adapter(
                tmp / f"r{rank}", shapes, config.num_hidden_layers, rank=rank, seed=rank
            ),
            base_id=BASE_ID,
        )
        for rank in args.ranks
    }
    local = LocalPackSource()
    for rank, pack in packs.items():
        local.publish(f"bench/r{rank}", pack)

    store = (tmp / "store").as_uri()
    with serve_subprocess(tmp / "catalog", store) as (_, address):
        colocated = CatalogClient(address)
        stream = CatalogClient(address, colocated=False)
        for rank, pack in packs.items():
            colocated.push(f"bench/r{rank}", pack)
        engine = ResidentEngine(
            base,
            catalog=colocated,
            num_slots=8,
            max_rank=64,
            base_id=BASE_ID,
            host_budget_bytes=4 << 30,
        )
        sources = {
            "host tier": colocated,
            "colocated catalog": colocated,
            "colocated, fresh map": colocated,
            "gRPC stream catalog": stream,
            "in-process bytes": local,
        }
        try:
            results = {
                rank: measure_rank(engine, sources, f"bench/r{rank}", args.repeats)
                for rank in args.ranks
            }
            path = colocated.colocated
            if path is None or path.reason or path.counters["fallbacks"]:
                raise AssertionError(f"the colocated client streamed: {path and path.reason}")
            kept = engine.stats()["kept_stagings"]
            counters = colocated.stats()["counters"]
            tier = {
                k: counters.get(f"nvme_{k}", 0)
                for k in ("bytes", "file_bytes", "referenced_fills", "fills")
            }
        finally:
            engine.close()
            colocated.close()
            stream.close()

    rows = []
    for rank, variants in results.items():
        base_ms = variants["host tier"]["attach_ms"]
        for variant, m in variants.items():
            rows.append(
                [
                    rank,
                    len(packs[rank]) / 2**20,
                    variant,
                    m["attach_ms"],
                    m["fetch_ms"],
                    m["stage_ms"],
                    m["copy_ms"],
                    m["attach_ms"] / base_ms,
                ]
            )
    print_table(
        f"attach of a dense adapter ({config.num_hidden_layers} layers, all 7 linears, bf16; "
        f"median of {args.repeats}); floor: colocated catalog <= {FLOOR}x host tier",
        ["rank", "MiB", "variant", "attach ms", "fetch", "stage", "slot copy", "x host tier"],
        rows,
    )
    ratios = {
        rank: v["colocated catalog"]["attach_ms"] / v["host tier"]["attach_ms"]
        for rank, v in results.items()
    }
    floors = {f"r{rank}_le_{FLOOR}x": ratio <= FLOOR for rank, ratio in ratios.items()}
    print(
        f"\nNVMe tier: {tier['bytes'] / 2**20:.1f} MiB of packs, data file "
        f"{tier['file_bytes'] / 2**20:.1f} MiB, {tier['referenced_fills']} of {tier['fills']} "
        "fills referenced the file:// store's files instead of copying them"
    )
    print(
        f"engine: {kept['hits']} fetching attaches reused a staging kept with the buffer the "
        f"fetch returned, {kept['kept']} stagings kept (a private buffer's goes with it)"
    )
    print("\nfloors:", floors)
    write_results(
        "colocated_attach" + ("_small" if args.small else ""),
        {
            "config": {
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "dtype": "bf16",
                "targets": list(ALL_LINEARS),
                "repeats": args.repeats,
                "torch_threads": 1,
            },
            "pack_bytes": {str(r): len(p) for r, p in packs.items()},
            "results": {str(r): v for r, v in results.items()},
            "colocated_over_host_tier": {str(r): x for r, x in ratios.items()},
            "nvme_tier": tier,
            "kept_stagings": kept,
            "floors_met": floors,
        },
    )


if __name__ == "__main__":
    main()
