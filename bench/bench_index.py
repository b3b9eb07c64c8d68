"""The LMDB revision index at catalog scale: ingest, size on disk, resolve and list latency.

Question: at N revisions (10^6 is the target), how fast does reindex ingest the log, how many
bytes of index does a revision cost, and how long does an in-process resolve or list page take?
Each is set beside raw py-lmdb doing the least comparable work in the same run (sequential puts
of same-sized records; one get in a fresh read transaction), so the ratio is what the index adds.

The log is shaped like ``Catalog.replay_into`` feeds it: adapters in (tenant, name) order, each
adapter's events in seq order: pushes, an eval metadata event, alias ``serving`` (and on a
quarter of adapters ``canary``), and a delete on every tenth adapter.

Run: .venv/bin/python bench/bench_index.py [--revisions 1000000] [--per-adapter 10]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, summarize, write_results
from catalog.digest import Digest
from catalog.events import Event
from catalog.index.lmdb_index import LmdbIndex
from catalog.model import AdapterName, Ref, Selector

LLAMA_MODULES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
BASES = [("meta-llama/Llama-3.1-8B", 32, 0), ("Qwen/Qwen3-30B-A3B", 48, 128), ("tiny-llama", 2, 0)]


def manifests() -> list[dict[str, Any]]:
    """A few pack manifest shapes, as a catalog of fine-tunes of three bases would hold."""
    shapes = []
    for base_id, layers, experts in BASES:
        for rank in (8, 16, 64):
            for modules in (LLAMA_MODULES[:2], LLAMA_MODULES[:4], LLAMA_MODULES):
                shapes.append(
                    {
                        "format_version": 1,
                        "base_id": base_id,
                        "rank": rank,
                        "alpha": float(2 * rank),
                        "dtype": "BF16",
                        "num_layers": layers,
                        "num_experts": experts,
                        "modules": [
                            {
                                "name": name,
                                "in_features": 4096,
                                "out_features": 4096,
                                "rank": rank,
                                "alpha": float(2 * rank),
                                "layers": list(range(layers)),
                                "num_experts": 0,
                            }
                            for name in modules
                        ],
                        "source": {"kind": "peft"},
                    }
                )
    return shapes


def adapter_of(number: int, tenants: int) -> AdapterName:
    return AdapterName(f"tenant-{number % tenants:04d}", f"policy-{number // tenants:07d}")


def digest_for(adapter: AdapterName, revision: int) -> Digest:
    return Digest("sha256", hashlib.sha256(f"{adapter}@{revision}".encode()).hexdigest())


def log(revisions: int, per_adapter: int, tenants: int) -> Iterator[Event]:
    """Every adapter's events in order; adapters in (tenant, name) order."""
    shapes = manifests()
    adapters = sorted(adapter_of(i, tenants) for i in range(revisions // per_adapter))
    at = 1.7e9
    for position, adapter in enumerate(adapters):
        seq = 0
        for number in range(1, per_adapter + 1):
            seq += 1
            at += 0.001
            yield Event(
                adapter,
                seq,
                "push",
                at,
                revision=number,
                digest=digest_for(adapter, number),
                size_bytes=1_000_000 + number,
                manifest=shapes[(position + number) % len(shapes)],
                metadata={"source": f"rl-run-{position % 977}", "step": str(number * 500)},
            )
        tail: list[dict[str, Any]] = [
            {"op": "metadata", "revision": per_adapter, "metadata": {"eval.win_rate": "0.61"}},
            {"op": "alias", "alias": "serving", "revision": max(1, per_adapter - 1)},
        ]
        if position % 4 == 0:
            tail.append({"op": "alias", "alias": "canary", "revision": per_adapter})
        if position % 10 == 0 and per_adapter > 2:
            tail.append({"op": "delete", "revision": 1})
        for fields in tail:
            seq += 1
            at += 0.001
            yield Event(adapter, seq, at=at, **fields)


def raw_baseline(path: Path, count: int, key_size: int, value_size: int) -> dict[str, float]:
    """py-lmdb alone: sequential puts in 20k-record transactions, then one get per read txn."""
    env = lmdb.open(str(path), map_size=1 << 36, sync=False, metasync=False)
    value = b"v" * value_size
    started = time.perf_counter()
    for start in range(0, count, 20_000):
        with env.begin(write=True) as txn:
            for i in range(start, min(count, start + 20_000)):
                txn.put(i.to_bytes(8, "big").rjust(key_size, b"k"), value)
    seconds = time.perf_counter() - started
    rng = random.Random(1)
    samples = []
    for _ in range(20_000):
        key = rng.randrange(count).to_bytes(8, "big").rjust(key_size, b"k")
        t0 = time.perf_counter()
        with env.begin(buffers=False) as txn:
            txn.get(key)
        samples.append(time.perf_counter() - t0)
    size = (path / "data.mdb").stat().st_size
    env.close()
    return {"puts_per_s": count / seconds, "bytes_per_record": size / count, **summarize(samples)}


def timed(samples: int, op: Callable[[int], object]) -> dict[str, float]:
    """Wall-clock latency, and this thread's CPU time per call: on a shared machine the wall
    p99 shows other processes' scheduling as much as this code, the CPU p99 does not."""
    gc.collect()
    wall, cpu = [], []
    for i in range(samples):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        op(i)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    cpu_summary = summarize(cpu)
    return {
        **summarize(wall),
        "cpu_p50_us": cpu_summary["p50_us"],
        "cpu_p99_us": cpu_summary["p99_us"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revisions", type=int, default=100_000)
    parser.add_argument("--per-adapter", type=int, default=10)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch-events", type=int, default=20_000)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to build (default: a temp dir)"
    )
    parser.add_argument("--name", default="index", help="results file name under bench/results")
    args = parser.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-index-"))
    shutil.rmtree(work / "index", ignore_errors=True)
    shutil.rmtree(work / "raw", ignore_errors=True)
    adapters = args.revisions // args.per_adapter
    revisions = adapters * args.per_adapter

    started = time.perf_counter()
    generated = sum(1 for _ in log(revisions, args.per_adapter, args.tenants))
    generate_s = time.perf_counter() - started

    index = LmdbIndex(work / "index", sync=False, batch_events=args.batch_events)
    started = time.perf_counter()
    applied = index.apply_many(log(revisions, args.per_adapter, args.tenants))
    ingest_s = time.perf_counter() - started
    assert applied == generated
    counts = index.counts()
    live = counts["revisions"]

    rng = random.Random(7)
    picks = [adapter_of(rng.randrange(adapters), args.tenants) for _ in range(args.samples)]
    numbers = [rng.randrange(2, args.per_adapter + 1) for _ in range(args.samples)]
    digest_refs = [
        Ref(a, Selector.DIGEST, f"sha256:{digest_for(a, n).hex[:12]}")
        for a, n in zip(picks, numbers, strict=True)
    ]
    resolve = {
        "latest": timed(
            args.samples, lambda i: index.resolve(Ref(picks[i], Selector.ALIAS, "latest"))
        ),
        "alias serving": timed(
            args.samples, lambda i: index.resolve(Ref(picks[i], Selector.ALIAS, "serving"))
        ),
        "number": timed(
            args.samples, lambda i: index.resolve(Ref(picks[i], Selector.REVISION, str(numbers[i])))
        ),
        "digest prefix (12 hex)": timed(args.samples, lambda i: index.resolve(digest_refs[i])),
        "parse + resolve str": timed(
            args.samples, lambda i: index.resolve(Ref.parse(f"{picks[i]}@serving"))
        ),
        "get_revision": timed(args.samples, lambda i: index.get_revision(picks[i], numbers[i])),
        "adapter_state": timed(args.samples, lambda i: index.adapter_state(picks[i])),
    }
    pages = max(200, args.samples // 50)
    tenant_of = [f"tenant-{rng.randrange(args.tenants):04d}" for _ in range(pages)]
    tokens = [index.list_adapters(t, page_size=1).next_token for t in tenant_of]
    listing = {
        "list_adapters page 100 (tenant)": timed(
            pages, lambda i: index.list_adapters(tenant_of[i], 100, tokens[i])
        ),
        "list_revisions page 100": timed(pages, lambda i: index.list_revisions(picks[i], 100)),
        "alias_history": timed(pages, lambda i: index.alias_history(picks[i], "serving")),
    }
    started = time.perf_counter()
    referenced = sum(1 for _ in index.referenced_digests())
    referenced_s = time.perf_counter() - started
    index.close()

    record_size = 330  # roughly the index's bytes per revision across its sub-databases
    raw = raw_baseline(work / "raw", revisions, 40, record_size)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ingest_rate = generated / ingest_s
    per_revision = counts["bytes_on_disk"] / live
    print_table(
        f"LMDB index: {revisions:,} revisions pushed, {live:,} live, {adapters:,} adapters,"
        f" {args.tenants} tenants ({generated:,} events)",
        ["measure", "value", "raw py-lmdb", "ratio"],
        [
            ["ingest events/s (apply_many)", ingest_rate, raw["puts_per_s"],
             ingest_rate / raw["puts_per_s"]],
            ["ingest wall s", ingest_s, "", ""],
            ["event generation s (included)", generate_s, "", ""],
            ["bytes on disk / live revision", per_revision, raw["bytes_per_record"],
             per_revision / raw["bytes_per_record"]],
            ["bytes used / live revision", counts["bytes_used"] / live, "", ""],
            ["referenced_digests full scan s", referenced_s, "", ""],
            ["peak RSS MiB", rss_mib, "", ""],
        ],
    )  # fmt: skip
    print_table(
        "in-process latency (us)",
        ["operation", "p50", "p99", "mean", "cpu p50", "cpu p99", "raw get p50", "p50 ratio"],
        [
            [name, s["p50_us"], s["p99_us"], s["mean_us"], s["cpu_p50_us"], s["cpu_p99_us"],
             raw["p50_us"], s["p50_us"] / raw["p50_us"]]
            for name, s in {**resolve, **listing}.items()
        ],
    )  # fmt: skip
    write_results(
        args.name,
        {
            "params": {**vars(args), "dir": str(work)},
            "revisions_pushed": revisions,
            "live_revisions": live,
            "adapters": adapters,
            "events": generated,
            "ingest_s": ingest_s,
            "ingest_events_per_s": ingest_rate,
            "event_generation_s": generate_s,
            "counts": counts,
            "bytes_on_disk_per_revision": per_revision,
            "bytes_used_per_revision": counts["bytes_used"] / live,
            "referenced_digests": referenced,
            "referenced_digests_scan_s": referenced_s,
            "peak_rss_mib": rss_mib,
            "resolve": resolve,
            "listing": listing,
            "raw_lmdb": raw,
        },
    )
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
