"""Server factory: the catalog over gRPC, with health checking and reflection."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.core import Catalog, Limits
from catalog.service.errors import ErrorMappingInterceptor
from catalog.service.servicer import MAX_MESSAGE_BYTES, CatalogServicer
from catalog.shutdown import ShutdownMarker
from catalog.storage import open_store

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Catalog"].full_name
DEFAULT_PORT = 7070


def open_catalog(
    root: Path, store_url: str | None = None, *, limits: Limits | None = None
) -> Catalog:
    """The catalog kept under ``root``: ``root/index`` (LMDB), ``root/spool`` and, unless
    ``store_url`` names another, the durable store in ``root/store`` (``file://``).

    Recovers interrupted writes, and rebuilds the index from the durable store when it is empty
    or may have lost writes in a machine crash (see ``catalog.shutdown``).
    """
    from catalog.index.lmdb_index import LmdbIndex

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    store = open_store(store_url or (root / "store").as_uri())
    marker = ShutdownMarker(root / "index.state")
    lost_writes = marker.open()
    catalog = Catalog(
        store,
        root / "index",
        lambda path: LmdbIndex(path, sync=False),
        spool_dir=root / "spool",
        limits=limits,
        on_close=marker.close,
    )
    if lost_writes:
        log.warning("the index was not closed cleanly before a reboot: rebuilding it")
        catalog.reindex()
    catalog.recover()
    if catalog.index_is_empty() and catalog.store_has_log():
        log.warning("index is empty but %s holds a log: rebuilding the index", store.url)
        catalog.reindex()
    return catalog


def create_server(
    catalog: Catalog, address: str = "127.0.0.1:0", *, max_workers: int = 32
) -> tuple[grpc.Server, int]:
    """A started server bound to ``address``; returns ``(server, port)`` (port 0 picks one)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="loracat-rpc"),
        interceptors=[ErrorMappingInterceptor()],
        options=options,
    )
    pb_grpc.add_CatalogServicer_to_server(CatalogServicer(catalog), server)
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
    ready: threading.Event | None = None,
) -> None:
    """Run the catalog until SIGINT/SIGTERM, then drain in-flight calls and close the index."""
    catalog = open_catalog(root, store_url)
    server, bound = create_server(catalog, f"{host}:{port}")
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    print(f"loracat catalog serving on {host}:{bound} (store {catalog.store.url})", flush=True)
    if ready is not None:
        ready.set()
    try:
        stop.wait()
    finally:
        server.stop(grace=5).wait()
        catalog.close()
