"""The floor under any pack fetch: a bare gRPC Python stream of the same bytes, nothing done.

A server process streams ``--megabytes`` of prebuilt messages (``--message-kib`` each, identity
serializers: no protobuf, no reads, no checks) to a client in this process that only counts
them; the asyncio and the thread-per-call server alike. What ``FetchPack`` adds on top of this
(NVMe chunk reads and checks, message encoding, the client's copy into its buffer and its hash)
is the part of a fetch our code owns; see the MoE section of ``docs/PERFORMANCE.md``. Prints a
table and writes ``bench/results/grpc_stream_floor.json``.

    .venv/bin/python bench/bench_grpc_stream_floor.py [--megabytes 38] [--repeats 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import print_table, write_results
from bench.grpc_servers import KINDS, serve_method

SERVICE, METHOD = "bench.Stream", "Stream"
OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


def _identity(data: bytes) -> bytes:
    return data


def serve(kind: str, port: int, megabytes: float, message_kib: int) -> None:
    size = message_kib << 10
    count = max(1, round(megabytes * 1e6 / size))
    messages = [os.urandom(size) for _ in range(count)]

    def stream(request: bytes, context: Any) -> Any:
        yield from messages

    async def stream_async(request: bytes, context: Any) -> Any:
        for message in messages:
            yield message

    streaming = partial(
        grpc.unary_stream_rpc_method_handler,
        request_deserializer=_identity,
        response_serializer=_identity,
    )
    behaviors = {"asyncio": stream_async, "threads": stream}
    serve_method(kind, port, SERVICE, METHOD, streaming, behaviors[kind], OPTIONS, threads=8)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=38.2, help="the 64-expert MoE pack")
    parser.add_argument("--message-kib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()

    from bench_push_resolve import start

    from tests.servers import free_port

    rows, results = [], {}
    for kind in KINDS:
        port = free_port()
        proc = start(
            [
                sys.executable,
                __file__,
                "--serve",
                kind,
                str(port),
                str(args.megabytes),
                str(args.message_kib),
            ],
            "ready",
        )
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
                call = channel.unary_stream(f"/{SERVICE}/{METHOD}", _registered_method=True)
                seconds, received = [], 0
                for _ in range(args.repeats + 2):
                    start_s = time.perf_counter()
                    received = sum(len(message) for message in call(b"", timeout=60))
                    seconds.append(time.perf_counter() - start_s)
                timed = seconds[2:]  # two warm-ups
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        median = statistics.median(timed)
        results[kind] = {"bytes": received, "median_s": median, "min_s": min(timed)}
        rows.append([kind, received / 1e6, median * 1e3, min(timed) * 1e3, received / median / 1e6])
    print_table(
        f"bare gRPC Python stream, {args.message_kib} KiB messages, server process -> client "
        f"(median of {args.repeats})",
        ["server", "MB", "median ms", "min ms", "MB/s"],
        rows,
    )
    write_results("grpc_stream_floor", {"config": vars(args), "results": results})


if __name__ == "__main__":
    main()
