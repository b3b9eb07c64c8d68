"""What the server's request record costs a resolve: the same catalog served with the record on
(the default, 100,000 entries) and off (`--request-record 0`), resolved side by side.

Question: is the record cheap enough to leave on? Two `loracat serve` processes over two copies
of the same catalog (N adapters); rounds alternate between them so drift on a shared machine
hits both alike; each round resolves R random references at concurrency C. The record fills and
rotates during a run with the defaults (160,000 resolves into 100,000 entries).

The end-to-end difference is below this machine's round-to-round noise, so the record's own
work per call (``RequestRecord.add`` with ``caller_of`` on a context carrying metadata, as
``Resolve`` runs it) is also timed alone, in a loop, and set against a resolve's round trip.

Run: .venv/bin/python bench/bench_request_record.py [--adapters 2000] [--resolves 20000]
     [--rounds 3] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_push_resolve import run_timed, serve_root
from bench.common import print_table, write_results
from catalog.client import CatalogClient
from catalog.pack.synthetic import random_pack
from catalog.service.request_record import RequestRecord, caller_of
from tests.servers import free_port


class _Context:
    """What ``caller_of`` reads of a gRPC context: metadata without the engine key, a peer."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "grpc-python/1.80"), ("authorization", "Bearer x"))

    def peer(self) -> str:
        return "ipv4:127.0.0.1:54321"


def record_cost_us(calls: int = 200_000) -> float:
    """Microseconds per ``add`` as ``Resolve`` makes it, the ring full and rotating."""
    record = RequestRecord(100_000)
    context = _Context()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for i in range(calls):
            record.add("resolve", f"{'t001/a000042'}@{i & 7}", 13_639_680, caller_of(context))
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=2000)
    parser.add_argument("--resolves", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="loracat-bench-record-"))
    ports = {"on": free_port(), "off": free_port()}
    servers = {
        "on": serve_root(root / "on", ports["on"]),
        "off": serve_root(root / "off", ports["off"], "--request-record", "0"),
    }
    try:
        clients = {k: CatalogClient(f"127.0.0.1:{p}") for k, p in ports.items()}
        pack = random_pack(
            [("self_attn.q_proj", 64, 64)], num_layers=2, rank=4, base_id="bench-base", seed=1
        )
        names = [f"t{i % 50:03d}/a{i:06d}" for i in range(args.adapters)]
        for client in clients.values():
            client.wait_ready()
            run_timed(lambda i, c=client: c.push(names[i], pack), len(names), 8)
        rng = random.Random(0)
        refs = [f"{rng.choice(names)}@1" for _ in range(args.resolves)]
        seconds: dict[tuple[str, int], list[float]] = {}
        for concurrency in args.concurrency:
            for client in clients.values():  # warm the answer caches alike
                run_timed(lambda i, c=client: c.resolve(refs[i]), len(refs), concurrency)
            for _ in range(args.rounds):
                for mode, client in clients.items():
                    took, _ = run_timed(
                        lambda i, c=client: c.resolve(refs[i]), len(refs), concurrency
                    )
                    seconds.setdefault((mode, concurrency), []).append(took)
        recorded = len(clients["on"].export_requests())
        rows = []
        results: dict[str, object] = {
            "adapters": args.adapters,
            "resolves_per_round": args.resolves,
            "rounds": args.rounds,
            "record_entries_at_end": recorded,
        }
        for concurrency in args.concurrency:
            on = statistics.median(seconds[("on", concurrency)])
            off = statistics.median(seconds[("off", concurrency)])
            rows.append(
                (
                    concurrency,
                    args.resolves / off,
                    args.resolves / on,
                    off / on,
                    (on - off) / args.resolves * 1e6,
                )
            )
            results[f"c{concurrency}"] = {
                "resolves_per_s_off": args.resolves / off,
                "resolves_per_s_on": args.resolves / on,
                "on_over_off_rate": off / on,
                "added_us_per_resolve": (on - off) / args.resolves * 1e6,
                "rounds_s_on": seconds[("on", concurrency)],
                "rounds_s_off": seconds[("off", concurrency)],
            }
        per_call = record_cost_us()
        latency_us = statistics.median(seconds[("off", 1)]) / args.resolves * 1e6
        results["record_add_us"] = per_call
        results["resolve_round_trip_us_c1"] = latency_us
        results["record_share_of_resolve"] = per_call / latency_us
        print_table(
            f"resolve with the request record on vs off ({args.adapters} adapters, medians of "
            f"{args.rounds} alternating rounds of {args.resolves}; {recorded} entries kept)",
            ["concurrency", "off /s", "on /s", "on/off rate", "added us/resolve"],
            rows,
        )
        print(
            f"the record's own work: {per_call:.2f} us per resolve, "
            f"{per_call / latency_us:.2%} of a resolve round trip ({latency_us:.0f} us at "
            "concurrency 1)"
        )
        write_results("request_record", results)
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
