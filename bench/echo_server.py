"""A raw gRPC echo server, configured like the catalog's, as the floor for RPC benchmarks.

Run: python bench/echo_server.py PORT
"""

from __future__ import annotations

import sys
import threading
from concurrent import futures

import grpc

ECHO_METHOD = "/bench.Echo/Echo"


def _identity(data: bytes) -> bytes:
    return data


def main() -> None:
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                lambda request, context: request,
                request_deserializer=_identity,
                response_serializer=_identity,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
