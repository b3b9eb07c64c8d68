"""A raw gRPC echo server, configured like the catalog's, as the floor for RPC benchmarks.

Same server kind (``grpc.aio`` on one event loop, the handler inline on the loop as the catalog's
index reads are), same channel options, and a registered method handler like the catalog's:
what differs from the catalog is only the handler's own work. (``--workers`` / ``--watchers``
are accepted for the benchmarks' symmetry with ``loracat serve``; an inline echo uses no pool.)

Run: python bench/echo_server.py PORT [--workers N] [--watchers N]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.grpc_servers import serve_method
from catalog.service.server import DEFAULT_MAX_HINT_WATCHERS, DEFAULT_MAX_WORKERS, server_options

ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"


def _identity(data: bytes) -> bytes:
    return data


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--workers", type=int, default=DEFAULT_MAX_WORKERS)
    parser.add_argument("--watchers", type=int, default=DEFAULT_MAX_HINT_WATCHERS)
    args = parser.parse_args()
    echo = partial(
        grpc.unary_unary_rpc_method_handler,
        request_deserializer=_identity,
        response_serializer=_identity,
    )
    serve_method("asyncio", args.port, ECHO_SERVICE, "Echo", echo, _echo, server_options())


if __name__ == "__main__":
    main()
