"""A raw gRPC echo server, configured like the catalog's, as the floor for RPC benchmarks.

Same server kind (sync ``grpc.server``), same thread pool (``max_workers`` plus the hint-watcher
threads, created only when used), same channel options, and a registered method handler like the
generated catalog code: what differs from the catalog is only the handler's own work.

Run: python bench/echo_server.py PORT [--workers N] [--watchers N]
"""

from __future__ import annotations

import argparse
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog.service.server import DEFAULT_MAX_HINT_WATCHERS, DEFAULT_MAX_WORKERS, server_options

ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"


def _identity(data: bytes) -> bytes:
    return data


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--workers", type=int, default=DEFAULT_MAX_WORKERS)
    parser.add_argument("--watchers", type=int, default=DEFAULT_MAX_HINT_WATCHERS)
    args = parser.parse_args()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers + args.watchers),
        options=server_options(),
    )
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=_identity, response_serializer=_identity
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers),))
    server.add_registered_method_handlers(ECHO_SERVICE, handlers)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
