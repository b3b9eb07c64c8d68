"""Push and resolve through gRPC at catalog scale, beside a raw gRPC echo RPC in the same run.

Question: how close to the cost of a bare gRPC round trip do the catalog's push and resolve get,
with N revisions in the catalog? Both servers run as separate processes on loopback with the
same thread-pool size; the client drives them from this process with C concurrent callers.

Run: .venv/bin/python bench/bench_push_resolve.py [--revisions 100000] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, summarize, write_results
from bench.echo_server import ECHO_METHOD
from catalog.client import CatalogClient
from catalog.pack.synthetic import random_pack
from tests.servers import free_port, loracat_command


def start(args: list[str], ready_line: str | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if ready_line is not None:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if ready_line not in line:
            raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc


def serve_root(root: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    """`loracat serve` on ``root`` as a child process, returned once it says it is serving."""
    return start(
        [*loracat_command(), "serve", "--root", str(root), "--port", str(port), *options], "serving"
    )


def run_timed(op: Callable[[int], None], count: int, concurrency: int) -> tuple[float, list[float]]:
    """Run ``op(i)`` for i in range(count) on ``concurrency`` threads; (seconds, latencies)."""
    latencies: list[float] = [0.0] * count

    def one(i: int) -> None:
        t0 = time.perf_counter()
        op(i)
        latencies[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if concurrency == 1:
        for i in range(count):
            one(i)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(count), chunksize=64))
    return time.perf_counter() - t0, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=100_000)
    parser.add_argument(
        "--adapters", type=int, default=10_000, help="revisions spread over this many adapters"
    )
    parser.add_argument("--resolves", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="loracat-bench-"))
    port, echo_port = free_port(), free_port()
    server = serve_root(root / "catalog", port)
    echo = start(
        [sys.executable, str(Path(__file__).with_name("echo_server.py")), str(echo_port)], "ready"
    )
    try:
        client = CatalogClient(f"127.0.0.1:{port}")
        client.wait_ready()
        echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}")
        echo_call = echo_channel.unary_unary(ECHO_METHOD)
        modules = [("self_attn.q_proj", 64, 64), ("self_attn.v_proj", 64, 64)]
        per_adapter = max(1, args.revisions // args.adapters)
        # Distinct bytes per revision of an adapter (identical bytes would dedupe to one revision);
        # adapters share those blobs, so the run measures the metadata path, not disk bandwidth.
        packs = [
            random_pack(modules, num_layers=2, rank=4, base_id="bench-base", seed=s)
            for s in range(per_adapter)
        ]
        payload = b"x" * 64

        rows = []
        results: dict[str, object] = {
            "revisions": args.revisions,
            "adapters": args.adapters,
            "pack_bytes": len(packs[0]),
        }
        conc_push = max(args.concurrency)

        def push(i: int) -> None:
            client.push(
                f"t{i % 100:03d}/a{i % args.adapters:06d}",
                packs[(i // args.adapters) % per_adapter],
            )

        def echo_once(i: int) -> None:
            echo_call(payload, timeout=10)

        run_timed(echo_once, 2000, conc_push)  # warm-up
        seconds, lat = run_timed(push, args.revisions, conc_push)
        push_stats = {
            **summarize(lat),
            "ops_per_s": args.revisions / seconds,
            "concurrency": conc_push,
        }
        seconds, lat = run_timed(echo_once, min(args.revisions, 20_000), conc_push)
        echo_push = {**summarize(lat), "ops_per_s": min(args.revisions, 20_000) / seconds}
        rows.append(
            (
                "push",
                conc_push,
                push_stats["ops_per_s"],
                push_stats["p50_us"],
                push_stats["p99_us"],
                echo_push["ops_per_s"],
                push_stats["ops_per_s"] / echo_push["ops_per_s"],
            )
        )
        results["push"] = {"catalog": push_stats, "echo": echo_push}

        names = [f"t{i % 100:03d}/a{i % args.adapters:06d}" for i in range(args.adapters)]
        refs = [
            random.choice(names) + random.choice(["", "@1", "@latest"])
            for _ in range(args.resolves)
        ]
        results["resolve"] = {}
        for conc in args.concurrency:
            run_timed(lambda i: client.resolve(refs[i]), min(2000, args.resolves), conc)
            seconds, lat = run_timed(lambda i: client.resolve(refs[i]), args.resolves, conc)
            res = {**summarize(lat), "ops_per_s": args.resolves / seconds}
            seconds, lat = run_timed(echo_once, args.resolves, conc)
            ech = {**summarize(lat), "ops_per_s": args.resolves / seconds}
            rows.append(
                (
                    "resolve",
                    conc,
                    res["ops_per_s"],
                    res["p50_us"],
                    res["p99_us"],
                    ech["ops_per_s"],
                    res["ops_per_s"] / ech["ops_per_s"],
                )
            )
            results["resolve"][str(conc)] = {"catalog": res, "echo": ech}  # type: ignore[index]

        stats = client.stats()
        results["index_bytes"] = stats["index_bytes"]
        results["index_bytes_per_revision"] = stats["index_bytes"] / max(1, stats["revisions"])
        print_table(
            f"catalog over gRPC: {stats['revisions']:,} revisions, {stats['adapters']:,} adapters "
            f"(index {stats['index_bytes'] / 2**20:.1f} MiB)",
            ["rpc", "callers", "ops/s", "p50 us", "p99 us", "echo ops/s", "ratio"],
            rows,
        )
        write_results("push_resolve", results)
    finally:
        for proc in (server, echo):
            proc.terminate()
            proc.wait(timeout=30)
        if args.root is None:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
