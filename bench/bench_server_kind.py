"""Which gRPC server kind serves Resolve misses best: asyncio (reads on the loop) or threads.

The catalog moved from a thread-per-call ``grpc.server`` to ``grpc.aio`` with index reads inline
on the event loop (see ``catalog/service/handlers.py``). This A/B runs both kinds side by side,
each beside an echo server of its own kind, on the same built index, with uniformly random refs
(nearly every call a miss of the answer cache, the case that made the difference): four server
processes, the four calls interleaved in rounds so load drift hits them alike.

- ``asyncio``: ``CatalogServicer.Resolve`` run inline by an ``async`` handler on a ``grpc.aio``
  server, beside a ``grpc.aio`` echo (what ``loracat serve`` and ``bench/echo_server.py`` run);
- ``threads``: the same ``CatalogServicer.Resolve`` as the handler of a ``grpc.server`` with a
  32-thread pool, beside an echo on the same kind of server (what the catalog ran before).

Needs a root built by ``bench/bench_scale.py --revisions N --root DIR`` (the 10^6 build: ~7 min).
Prints a table and writes ``bench/results/server_kind.json``.

    .venv/bin/python bench/bench_server_kind.py --root DIR [--concurrency 1 8 64]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import print_table, write_results
from bench.grpc_servers import KINDS, serve_method

RESOLVE = ("loracat.v1.Catalog", "Resolve")
ECHO = ("bench.Echo", "Echo")


def _identity(data: bytes) -> bytes:
    return data


def serve(role: str, kind: str, root: Path, port: int) -> None:
    """One server process: ``role`` catalog or echo, ``kind`` asyncio or threads."""
    from catalog._proto.loracat.v1 import catalog_pb2 as pb
    from catalog.service.server import open_catalog, server_options
    from catalog.service.servicer import CatalogServicer

    if role == "catalog":
        behavior = CatalogServicer(open_catalog(root, cache_bytes=0)).Resolve
        (service, method), decode, encode = (
            RESOLVE,
            pb.ResolveRequest.FromString,
            pb.Revision.SerializeToString,
        )
    else:

        def behavior(request: Any, context: Any) -> Any:
            return request

        (service, method), decode, encode = ECHO, _identity, _identity

    async def inline(request: Any, context: Any) -> Any:
        return behavior(request, context)

    unary = partial(
        grpc.unary_unary_rpc_method_handler, request_deserializer=decode, response_serializer=encode
    )
    behaviors = {"asyncio": inline, "threads": behavior}
    serve_method(kind, port, service, method, unary, behaviors[kind], server_options())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a bench_scale build")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--resolves", type=int, default=10_000, help="per call kind and level")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    from bench_push_resolve import start
    from bench_scale import alternating, refs_of_built_root

    from catalog._proto.loracat.v1 import catalog_pb2 as pb
    from tests.servers import free_port

    samples = refs_of_built_root(
        args.root, args.resolves, ["uniform"], len(KINDS) * len(args.concurrency)
    )["uniform"]
    procs, calls = [], {}
    try:
        for kind in KINDS:
            for role, (service, method) in (("catalog", RESOLVE), ("echo", ECHO)):
                port = free_port()
                command = [sys.executable, __file__, "--serve", role, kind, str(args.root)]
                procs.append(start([*command, str(port)], "ready"))
                channel = grpc.insecure_channel(f"127.0.0.1:{port}")
                calls[(kind, role)] = channel.unary_unary(
                    f"/{service}/{method}", _registered_method=True
                )
        payload = calls[("asyncio", "catalog")](
            pb.ResolveRequest(ref=samples[0][0]).SerializeToString(), timeout=10
        )
        results: dict[str, Any] = {}
        rows = []
        for level, conc in enumerate(args.concurrency):
            requests = {
                kind: [
                    pb.ResolveRequest(ref=ref).SerializeToString()
                    for ref in samples[len(KINDS) * level + k]
                ]
                for k, kind in enumerate(KINDS)
            }
            ops: dict[str, Any] = {}
            for kind in KINDS:
                ops[f"{kind} resolve"] = lambda i, c=calls[(kind, "catalog")], r=requests[kind]: c(
                    r[i], timeout=30
                )
                ops[f"{kind} echo"] = lambda i, c=calls[(kind, "echo")]: c(payload, timeout=30)
            res = alternating(ops, args.resolves, conc, args.rounds)
            results[str(conc)] = res
            row: list[Any] = [conc]
            for kind in KINDS:
                resolve, echo = res[f"{kind} resolve"], res[f"{kind} echo"]
                ratio = resolve["ops_per_s"] / echo["ops_per_s"]
                results[str(conc)][f"{kind} ratio"] = ratio
                row += [resolve["ops_per_s"], echo["ops_per_s"], ratio]
            rows.append(row)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    print_table(
        "Resolve misses (uniform refs) beside echo, per server kind (floor: >= 0.70x)",
        [
            "callers",
            "asyncio resolve/s",
            "asyncio echo/s",
            "asyncio ratio",
            "threads resolve/s",
            "threads echo/s",
            "threads ratio",
        ],
        rows,
    )
    write_results(
        "server_kind",
        {"config": {"root": str(args.root), "resolves": args.resolves}, "results": results},
    )


if __name__ == "__main__":
    main()
