"""One engine sweeps through 10^5 distinct adapters, attaching each in turn through the catalog.

Question: does a single resident engine keep attaching at a steady rate, with flat memory, when
every attach is a new adapter (resolve + fetch over gRPC, stage, evict the LRU slot, copy)?
MinT swept 100K adapters on one engine; this is the same measurement on a tiny base.

The catalog is built by bulk-writing the durable log of N adapters with N distinct tiny packs
and rebuilding the index from it (as `bench_scale.py` does), then served by `loracat serve`.
RSS is sampled every 1% of the sweep; the table shows the attach rate and RSS per decile.

Run: .venv/bin/python bench/bench_sweep.py [--adapters 100000] [--slots 8] [--device cuda]
(on a GPU the engine's slots live there; the attach path adds the pinned staging and the
slot copy to the device; device memory is sampled beside RSS).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_push_resolve import serve_root
from bench.bench_scale import bulk_write
from bench.common import add_device_argument, device_info, print_table, write_results
from catalog.client import CatalogClient
from catalog.core import Catalog
from catalog.digest import Digest
from catalog.events import Event
from catalog.index.lmdb_index import LmdbIndex
from catalog.model import AdapterName
from catalog.pack import read_pack
from catalog.pack.synthetic import random_pack
from catalog.shutdown import ShutdownMarker
from catalog.storage.local import LocalDirStore
from engine_plugin import ResidentEngine
from tests.factories import build_model, tiny_llama_config
from tests.servers import free_port

BASE_ID = "sweep-base"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def adapters_and_events(count: int) -> Iterator[tuple[Event, tuple[Digest, bytes]]]:
    for i in range(count):
        data = random_pack(
            [("self_attn.q_proj", 64, 64)], num_layers=2, rank=1 + i % 4, base_id=BASE_ID, seed=i
        )
        digest = Digest.of(data)
        event = Event(
            AdapterName(f"t{i % 100:03d}", f"a{i:06d}"),
            1,
            "push",
            1.7e9 + i,
            revision=1,
            digest=digest,
            size_bytes=len(data),
            manifest=read_pack(data).manifest.to_json(),
        )
        yield event, (digest, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100_000)
    parser.add_argument("--slots", type=int, default=8)
    add_device_argument(parser)
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="loracat-sweep-"))
    try:
        t0 = time.perf_counter()
        store = LocalDirStore(root / "store", fsync=False)
        pairs = list(adapters_and_events(args.adapters))
        bulk_write(store, [e for e, _ in pairs], [(d, b, None) for _, (d, b) in pairs], 8)
        del pairs
        catalog = Catalog(
            store, root / "index", lambda p: LmdbIndex(p, sync=False), spool_dir=root / "spool"
        )
        catalog.reindex()
        catalog.close()
        ShutdownMarker(root / "index.state").close()
        setup_s = time.perf_counter() - t0

        port = free_port()
        server = serve_root(root, port, "--cache-bytes", "0")
        try:
            client = CatalogClient(f"127.0.0.1:{port}")
            model = build_model(tiny_llama_config())
            engine = ResidentEngine(
                model,
                catalog=client,
                num_slots=args.slots,
                max_rank=4,
                base_id=BASE_ID,
                target_modules=["q_proj"],
                host_budget_bytes=4 << 20,
                device=args.device,
            )
            names = [f"t{i % 100:03d}/a{i:06d}" for i in range(args.adapters)]
            deciles: list[tuple[int, float, float]] = []
            samples: list[tuple[int, float, float]] = []
            step = max(1, args.adapters // 100)
            start_rss = rss_mib()
            t_start = last = time.perf_counter()
            for i, name in enumerate(names, start=1):
                engine.attach(name)
                if i % step == 0:
                    now = time.perf_counter()
                    samples.append((i, step / (now - last), rss_mib()))
                    last = now
                    if i % (step * 10) == 0:
                        deciles.append(samples[-1])
            if cuda:
                torch.cuda.synchronize(args.device)
            total_s = time.perf_counter() - t_start
            device_mib = torch.cuda.memory_allocated(args.device) / 2**20 if cuda else None
            stats = engine.stats()
            engine.close()
            client.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
        rss = [s[2] for s in samples]
        results = {
            "device": device_info(args.device),
            "device_memory_mib_end": device_mib,
            "adapters": args.adapters,
            "slots": args.slots,
            "setup_s": setup_s,
            "sweep_s": total_s,
            "attaches_per_s": args.adapters / total_s,
            "rss_mib_start": start_rss,
            "rss_mib_first_decile": deciles[0][2] if deciles else None,
            "rss_mib_end": rss[-1] if rss else None,
            "rss_growth_mib_after_first_decile": (rss[-1] - deciles[0][2]) if deciles else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "evictions": stats["evictions"],
            "misses": stats["misses"],
            "samples": samples,
        }
        print_table(
            f"one engine, {args.slots} slots, {args.adapters:,} adapters attached over gRPC "
            f"({total_s:.0f}s, {args.adapters / total_s:,.0f} attaches/s)",
            ["attached", "attaches/s (last 1%)", "RSS MiB"],
            [(f"{n:,}", rate, mem) for n, rate, mem in deciles],
        )
        write_results("sweep", results)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
