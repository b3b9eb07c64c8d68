"""Mixed load from many threads against `loracat serve`, without and with --auth, side by side.

Question: does the guard (token hash, tenant check, identity per call) cost throughput, and does
a long mixed load (resolves, listings, fetches, pushes, alias moves) run without errors and
with flat memory?

Run: .venv/bin/python bench/bench_auth_load.py [--threads 64] [--seconds 30]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_results
from catalog.client import CatalogClient
from catalog.errors import CatalogError
from catalog.pack.synthetic import random_pack
from catalog.service.auth import token_sha256
from tests.servers import serve_subprocess

TOKEN = "load-writer-token"
TENANTS = [f"t{i}" for i in range(8)]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(work: Path, threads: int, seconds: float, auth: bool) -> dict[str, Any]:
    extra: list[str] = []
    options: dict[str, Any] = {}
    if auth:
        path = work / "auth.toml"
        path.write_text(
            f'[[principal]]\nname = "loader"\ntoken_sha256 = "{token_sha256(TOKEN)}"\n'
            'tenants = ["t*"]\nrole = "write"\n'
        )
        extra, options = ["--auth", str(path)], {"token": TOKEN}
    root = work / ("root-auth" if auth else "root-open")
    with serve_subprocess(root, extra_args=extra, client_options=options) as (proc, address):
        packs = [
            random_pack([("self_attn.q_proj", 128, 128)], num_layers=2, rank=8, base_id="b", seed=s)
            for s in range(16)
        ]
        with CatalogClient(address, **options) as seed:
            for i, tenant in enumerate(TENANTS):
                seed.push(f"{tenant}/m", packs[i], aliases=["serving"])
        counts: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        lock = threading.Lock()
        stop = threading.Event()
        rss = [rss_mib(proc.pid)]

        def worker(number: int) -> None:
            rng = random.Random(number)
            with CatalogClient(address, **options) as client:
                while not stop.is_set():
                    tenant = rng.choice(TENANTS)
                    roll = rng.random()
                    try:
                        if roll < 0.70:
                            kind = "resolve"
                            client.resolve(f"{tenant}/m@serving")
                        elif roll < 0.80:
                            kind = "list"
                            client.list_adapters(tenant)
                        elif roll < 0.92:
                            kind = "fetch"
                            client.fetch(f"{tenant}/m@serving")
                        elif roll < 0.97:
                            kind = "push"
                            client.push(f"{tenant}/m", rng.choice(packs))
                        else:
                            kind = "alias"
                            client.set_alias(f"{tenant}/m", "canary", 1)
                    except CatalogError as exc:
                        with lock:
                            errors[f"{kind} {exc.grpc_code}"] += 1
                        continue
                    with lock:
                        counts[kind] += 1

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        began = time.perf_counter()
        for t in pool:
            t.start()
        while time.perf_counter() - began < seconds:
            time.sleep(min(5.0, seconds / 6))
            rss.append(rss_mib(proc.pid))
        stop.set()
        for t in pool:
            t.join()
        elapsed = time.perf_counter() - began
    return {
        "auth": auth,
        "ops": dict(counts),
        "ops_per_s": round(sum(counts.values()) / elapsed, 1),
        "resolves_per_s": round(counts["resolve"] / elapsed, 1),
        "errors": dict(errors),
        "rss_mib": [round(r) for r in rss],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loracat-load-") as work:
        runs = [run(Path(work), args.threads, args.seconds, auth) for auth in (False, True)]
    rows = [
        [
            "--auth" if r["auth"] else "no auth",
            r["ops_per_s"],
            r["resolves_per_s"],
            sum(r["errors"].values()),
            f"{r['rss_mib'][0]} -> {max(r['rss_mib'])} -> {r['rss_mib'][-1]}",
        ]
        for r in runs
    ]
    ratio = runs[1]["ops_per_s"] / runs[0]["ops_per_s"]
    rows.append(["with/without", round(ratio, 2), "", "", ""])
    print_table(
        f"{args.threads} threads, {args.seconds:.0f} s each, 70% resolve 10% list 12% fetch "
        "5% push 3% alias",
        ["server", "ops/s", "resolves/s", "errors", "RSS MiB start -> max -> end"],
        rows,
    )
    write_results(
        "auth_load",
        {"threads": args.threads, "seconds": args.seconds, "runs": runs, "ratio": ratio},
    )


if __name__ == "__main__":
    main()
