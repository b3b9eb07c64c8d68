"""Server factory: the catalog over gRPC, with health checking and reflection."""

from __future__ import annotations

import copy
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from time import perf_counter
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.core import Catalog, Limits
from catalog.digest import DEFAULT_ALGORITHM
from catalog.errors import ResourceExhausted
from catalog.service.errors import abort_for, is_abort
from catalog.service.metrics import RPC_LATENCY
from catalog.service.servicer import MAX_MESSAGE_BYTES, CatalogServicer
from catalog.shutdown import ShutdownMarker
from catalog.storage import open_store

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Catalog"]
SERVICE_NAME = SERVICE.full_name
DEFAULT_PORT = 7070


DEFAULT_CACHE_BYTES = 8 << 30


def open_catalog(
    root: Path,
    store_url: str | None = None,
    *,
    limits: Limits | None = None,
    cache_dir: Path | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    cache_policy: str = "default",
    digest_algorithm: str = DEFAULT_ALGORITHM,
) -> Catalog:
    """The catalog kept under ``root``: ``root/index`` (LMDB), ``root/cache`` (the NVMe pack
    cache, unless ``cache_dir`` names another; ``cache_bytes=0`` runs without one),
    ``root/spool`` and, unless ``store_url`` names another, the durable store in ``root/store``.

    Recovers interrupted writes, and rebuilds the index from the durable store when it is empty
    or may have lost writes in a machine crash (see ``catalog.shutdown``).
    """
    from catalog.cache.pack_cache import PackCache
    from catalog.index.lmdb_index import LmdbIndex

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    store = open_store(store_url or (root / "store").as_uri())
    cache = (
        PackCache(Path(cache_dir or root / "cache"), cache_bytes, cache_policy)
        if cache_bytes > 0
        else None
    )
    marker = ShutdownMarker(root / "index.state")
    lost_writes = marker.open()
    catalog = Catalog(
        store,
        root / "index",
        lambda path: LmdbIndex(path, sync=False),
        spool_dir=root / "spool",
        limits=limits,
        on_close=marker.close,
        pack_cache=cache,
        digest_algorithm=digest_algorithm,
    )
    if lost_writes:
        log.warning("the index was not closed cleanly before a reboot: rebuilding it")
        catalog.reindex()
    catalog.recover()
    if catalog.index_is_empty() and catalog.store_has_log():
        log.warning("index is empty but %s holds a log: rebuilding the index", store.url)
        catalog.reindex()
    return catalog


#: Threads for unary calls and short streams (push, fetch, prefetch). Pools of 1 to 32 measured
#: alike within the noise of a 2-core machine (bench/bench_scale.py, 2026-11-23).
DEFAULT_MAX_WORKERS = 32
#: Hint watchers hold a thread each for as long as their engine runs. The pool has this many
#: threads beside ``max_workers`` (created only when used; idle ones serve any call), and at most
#: this many watchers are admitted, so watchers never take the last ``max_workers`` threads.
DEFAULT_MAX_HINT_WATCHERS = 256
HINT_WATCH_METHOD = "WatchHints"

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def server_options() -> list[tuple[str, int]]:
    """The channel options of the catalog server (``bench/echo_server.py`` uses the same)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]


def _served_unary(behavior: Behavior, observe: Callable[[float], None]) -> Behavior:
    def served(request: Any, context: grpc.ServicerContext) -> Any:
        start = perf_counter()
        try:
            return behavior(request, context)
        except Exception as exc:
            if is_abort(exc):
                raise
            abort_for(context, exc)
        finally:
            observe(perf_counter() - start)

    return served


def _served_stream(behavior: Behavior, observe: Callable[[float], None]) -> Behavior:
    def served(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start = perf_counter()
        try:
            yield from behavior(request, context)
        except Exception as exc:
            if is_abort(exc):
                raise
            abort_for(context, exc)
        finally:
            observe(perf_counter() - start)

    return served


def _bounded_stream(behavior: Behavior, slots: int) -> Behavior:
    free = threading.BoundedSemaphore(slots)

    def bounded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if not free.acquire(blocking=False):
            raise ResourceExhausted(
                f"the catalog already serves {slots} hint watchers; retry later"
            )
        try:
            yield from behavior(request, context)
        finally:
            free.release()

    return bounded


def served_methods(
    servicer: CatalogServicer, *, max_hint_watchers: int = DEFAULT_MAX_HINT_WATCHERS
) -> CatalogServicer:
    """A copy of ``servicer`` with each method wrapped once, for registration with the server.

    The wrapper maps exceptions to status codes (``catalog.service.errors.abort_for``) and
    observes the call's duration in ``loracat_rpc_seconds`` (streams: until the last message);
    ``WatchHints`` refuses more than ``max_hint_watchers`` streams with RESOURCE_EXHAUSTED.
    Wrapping here rather than in a ``grpc.ServerInterceptor`` keeps the per-call cost to one
    Python frame: gRPC runs interceptors on its single polling thread for every call.
    """
    served = copy.copy(servicer)
    for method in SERVICE.methods:
        behavior = getattr(servicer, method.name)
        if method.name == HINT_WATCH_METHOD:
            behavior = _bounded_stream(behavior, max_hint_watchers)
        observe = RPC_LATENCY.labels(method.name).observe
        wrap = _served_stream if method.server_streaming else _served_unary
        setattr(served, method.name, wrap(behavior, observe))
    return served


def create_server(
    catalog: Catalog,
    address: str = "127.0.0.1:0",
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_hint_watchers: int = DEFAULT_MAX_HINT_WATCHERS,
) -> tuple[grpc.Server, int]:
    """A started server bound to ``address``; returns ``(server, port)`` (port 0 picks one).

    ``max_workers`` threads serve unary calls and short streams; up to ``max_hint_watchers``
    more serve ``WatchHints`` streams, which each hold a thread while their engine runs.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max_workers + max_hint_watchers, thread_name_prefix="loracat-rpc"
        ),
        options=server_options(),
    )
    pb_grpc.add_CatalogServicer_to_server(
        served_methods(CatalogServicer(catalog), max_hint_watchers=max_hint_watchers), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (SERVICE_NAME, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the catalog server to {address}")
    server.start()
    return server, port


def serve_forever(
    root: Path,
    store_url: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    cache_dir: Path | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    cache_policy: str = "default",
    metrics_port: int | None = None,
    demand_hint_interval_s: float = 5.0,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_hint_watchers: int = DEFAULT_MAX_HINT_WATCHERS,
    digest_algorithm: str = DEFAULT_ALGORITHM,
) -> None:
    """Run the catalog until SIGINT/SIGTERM, then drain in-flight calls and close the index."""
    catalog = open_catalog(
        root,
        store_url,
        cache_dir=cache_dir,
        cache_bytes=cache_bytes,
        cache_policy=cache_policy,
        digest_algorithm=digest_algorithm,
    )
    server, bound = create_server(
        catalog, f"{host}:{port}", max_workers=max_workers, max_hint_watchers=max_hint_watchers
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    if metrics_port is not None:
        from catalog.service.metrics import start_metrics_server

        metrics_bound = start_metrics_server(catalog, host, metrics_port)
        print(f"loracat metrics on http://{host}:{metrics_bound}/metrics", flush=True)
    print(f"loracat catalog serving on {host}:{bound} (store {catalog.store.url})", flush=True)
    try:
        while not stop.wait(demand_hint_interval_s):
            catalog.publish_demand_hints()
    finally:
        server.stop(grace=5).wait()
        catalog.close()
