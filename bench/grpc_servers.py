"""One-method gRPC servers for the benchmarks, of either kind the catalog has run on.

``asyncio``: a ``grpc.aio`` server whose handler runs on the event loop (the catalog's index
reads, ``bench/echo_server.py``); ``threads``: a ``grpc.server`` with a thread per call (the
catalog before 2026-12-02). The benchmarks run these as child processes that print ``ready``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc

KINDS = ("asyncio", "threads")


def serve_method(
    kind: str,
    port: int,
    service: str,
    method: str,
    handler: Callable[[Any], grpc.RpcMethodHandler],
    behavior: Any,
    options: Sequence[tuple[str, Any]],
    *,
    threads: int = 32,
) -> None:
    """Serve ``service/method`` on ``127.0.0.1:port`` until killed; prints ``ready`` once up.

    ``handler`` makes the method handler from ``behavior`` (e.g. a partial of
    ``grpc.unary_unary_rpc_method_handler`` with the serializers); ``behavior`` is an ``async``
    function or generator for ``asyncio``, a plain one for ``threads`` (a pool of ``threads``).
    """
    if kind not in KINDS:
        raise ValueError(f"server kind {kind!r} is not one of {KINDS}")

    def register(server: Any) -> None:
        handlers = {method: handler(behavior)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)
        server.add_insecure_port(f"127.0.0.1:{port}")

    if kind == "threads":
        server = grpc.server(futures.ThreadPoolExecutor(threads), options=options)
        register(server)
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()
        return

    async def main() -> None:
        aio = grpc.aio.server(options=options)
        register(aio)
        await aio.start()
        print("ready", flush=True)
        await aio.wait_for_termination()

    asyncio.run(main())
