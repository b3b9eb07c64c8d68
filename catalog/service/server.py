"""Server factory: the catalog over gRPC, with health checking and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from catalog.core import Catalog, Limits
from catalog.digest import DEFAULT_ALGORITHM, Digest
from catalog.errors import InvalidArgument
from catalog.locks import never_wait_here
from catalog.peft_export import PeftExporter
from catalog.service.auth import Authenticator, Guard, check_exposure, open_audit_log
from catalog.service.handlers import SERVICE_NAME, catalog_handlers
from catalog.service.metrics import ACCESS_LOGGER
from catalog.service.request_record import DEFAULT_RECORD_ENTRIES, RequestRecord
from catalog.service.servicer import MAX_MESSAGE_BYTES, CatalogServicer
from catalog.service.tls import server_credentials
from catalog.shutdown import ShutdownMarker
from catalog.storage import open_store
from catalog.storage.base import BlobStore
from catalog.warm_inbox import WarmPolicy

log = logging.getLogger(__name__)
DEFAULT_PORT = 7070


DEFAULT_CACHE_BYTES = 8 << 30


def _local_blob_files(store: BlobStore) -> Callable[[Digest], Path] | None:
    """Where a ``file://`` store keeps each pack: the NVMe tier references those files instead
    of holding a second copy when they are on its filesystem (``PackCache(local_files=...)``)."""
    from catalog.events import blob_key
    from catalog.storage.local import LocalDirStore

    if not isinstance(store, LocalDirStore):
        return None
    root = store.root
    return lambda digest: root / blob_key(digest)


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
    from catalog.pack.finite import pack_values_finite

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    store = open_store(store_url or (root / "store").as_uri())
    cache = (
        PackCache(
            Path(cache_dir or root / "cache"),
            cache_bytes,
            cache_policy,
            local_files=_local_blob_files(store),
            values_finite=pack_values_finite,
        )
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


def _reload(authenticator: Authenticator) -> None:
    """SIGHUP: read the auth file again; a bad file keeps the principals in force."""
    try:
        count = authenticator.reload()
    except InvalidArgument as exc:
        log.error("auth file not reloaded, the previous principals stay in force: %s", exc)
    else:
        log.info("auth file %s reloaded: %d principals", authenticator.path, count)


#: Threads for the calls that do not run on the event loop: writes, fetches, prefetch and the
#: like (see ``catalog.service.handlers``).
DEFAULT_MAX_WORKERS = 32
#: Hint watchers hold a thread each for as long as their engine runs. The pool has this many
#: threads beside ``max_workers`` (created only when used; idle ones serve any call), and at most
#: this many watchers are admitted, so watchers never take the last ``max_workers`` threads.
DEFAULT_MAX_HINT_WATCHERS = 256


def server_options() -> list[tuple[str, int]]:
    """The channel options of the catalog server (``bench/echo_server.py`` uses the same)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]


class CatalogServer:
    """A started ``grpc.aio`` server on an event loop of its own thread, with its thread pool
    (see ``catalog.service.handlers`` for what runs where). Callers need no asyncio: ``stop``
    and ``wait_for_termination`` behave like ``grpc.Server``'s."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        server: grpc.aio.Server,
        pool: ThreadPoolExecutor,
        servicer: CatalogServicer | None = None,
    ) -> None:
        self._loop = loop
        self._thread = thread
        self._server = server
        self._pool = pool
        self._servicer = servicer
        self._stopped: threading.Event | None = None
        self._lock = threading.Lock()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, give those in flight ``grace`` seconds (None: cancel them now),
        then end the loop and the pool. Returns an event set once all of that is done."""
        with self._lock:
            if self._stopped is not None:
                return self._stopped
            stopped = self._stopped = threading.Event()
        stopping = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)

        def finish() -> None:
            try:
                stopping.result()
            except Exception:  # pragma: no cover - shutting down whatever happened
                log.exception("the catalog server did not stop cleanly")
            finally:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
                if self._servicer is not None:  # no call runs now: its inbox may go
                    self._servicer.close()
                stopped.set()

        threading.Thread(target=finish, name="loracat-grpc-stop", daemon=True).start()
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` passes (False)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def create_server(
    catalog: Catalog,
    address: str = "127.0.0.1:0",
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_hint_watchers: int = DEFAULT_MAX_HINT_WATCHERS,
    guard: Guard | None = None,
    credentials: grpc.ServerCredentials | None = None,
    record_requests: int = DEFAULT_RECORD_ENTRIES,
    access_log: bool = False,
    peft_export_root: Path | None = None,
    warm_inbox: WarmPolicy | None = None,
) -> tuple[CatalogServer, int]:
    """A started server bound to ``address``; returns ``(server, port)`` (port 0 picks one).

    Index reads run on the server's event loop; ``max_workers`` pool threads serve the other
    unary calls and short streams, and up to ``max_hint_watchers`` more serve ``WatchHints``
    streams, which each hold a thread while their engine runs. ``guard`` authenticates and
    authorizes every call (``catalog.service.auth``); ``credentials`` serve TLS
    (``catalog.service.tls``). ``record_requests``: resolves and fetches kept for ``loracat
    trace export`` (0: none; ``catalog.service.request_record``). ``access_log``: one line per
    call on the ``loracat.access`` logger. ``peft_export_root``: where ``ExportPeftDir`` may
    write PEFT directories for colocated engines (``catalog.peft_export``; None: nowhere).
    ``warm_inbox``: the warm files the push inbox keeps for colocated pushes
    (``catalog.warm_inbox``; None: its default, two). Raises ``OSError`` when the address
    cannot be bound, ``InvalidArgument`` for a ``peft_export_root`` that is not a directory.
    """
    exporter = PeftExporter(peft_export_root)
    pool = ThreadPoolExecutor(
        max_workers=max_workers + max_hint_watchers, thread_name_prefix="loracat-rpc"
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="loracat-grpc-loop", daemon=True)
    thread.start()

    servicer = CatalogServicer(
        catalog,
        RequestRecord(record_requests) if record_requests > 0 else None,
        exporter,
        warm_inbox or WarmPolicy(),
    )

    async def start() -> tuple[grpc.aio.Server, int]:
        never_wait_here()  # the loop thread: index reads that would wait move to the pool
        server = grpc.aio.server(options=server_options())
        handlers = catalog_handlers(
            servicer,
            pool,
            max_hint_watchers=max_hint_watchers,
            guard=guard,
            access_log=logging.getLogger(ACCESS_LOGGER) if access_log else None,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in (SERVICE_NAME, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"could not bind the catalog server to {address}")
        await server.start()
        return server, port

    try:
        server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        pool.shutdown(wait=False)
        servicer.close()
        raise
    return CatalogServer(loop, thread, server, pool, servicer), port


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
    auth_file: Path | None = None,
    audit_log: str | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_client_ca: Path | None = None,
    insecure: bool = False,
    record_requests: int = DEFAULT_RECORD_ENTRIES,
    access_log: bool = False,
    peft_export_root: Path | None = None,
    warm_inbox: WarmPolicy | None = None,
) -> None:
    """Run the catalog until SIGINT/SIGTERM, then drain in-flight calls and close the index.

    ``auth_file`` turns on authentication (``catalog.service.auth``; SIGHUP reloads it), and
    without it a non-loopback ``host`` is refused unless ``insecure``. ``audit_log`` (a file or
    ``-``) gets a line per write-side call; ``tls_cert``/``tls_key`` serve TLS, mutual with
    ``tls_client_ca``. Raises ``InvalidArgument`` for a bad auth file, TLS file or exposure.
    """
    check_exposure(host, authenticated=auth_file is not None, insecure=insecure)
    authenticator = None if auth_file is None else Authenticator(auth_file)
    audit = None if audit_log is None else open_audit_log(audit_log)
    guard = None if authenticator is None and audit is None else Guard(authenticator, audit)
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key")
    credentials = (
        None
        if tls_cert is None or tls_key is None
        else server_credentials(tls_cert, tls_key, tls_client_ca)
    )
    catalog = open_catalog(
        root,
        store_url,
        cache_dir=cache_dir,
        cache_bytes=cache_bytes,
        cache_policy=cache_policy,
        digest_algorithm=digest_algorithm,
    )
    server, bound = create_server(
        catalog,
        f"{host}:{port}",
        max_workers=max_workers,
        max_hint_watchers=max_hint_watchers,
        guard=guard,
        credentials=credentials,
        record_requests=record_requests,
        access_log=access_log,
        peft_export_root=peft_export_root,
        warm_inbox=warm_inbox,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        if authenticator is not None:
            signal.signal(signal.SIGHUP, lambda signum, frame: _reload(authenticator))
    if metrics_port is not None:
        from catalog.service.metrics import start_metrics_server

        metrics_bound = start_metrics_server(catalog, host, metrics_port)
        print(f"loracat metrics on http://{host}:{metrics_bound}/metrics", flush=True)
    scheme = "grpc" if credentials is None else "grpcs"
    print(
        f"loracat catalog serving on {scheme}://{host}:{bound} (store {catalog.store.url}"
        f"{', auth ' + str(auth_file) if auth_file else ''})",
        flush=True,
    )
    try:
        while not stop.wait(demand_hint_interval_s):
            catalog.publish_demand_hints()
    finally:
        server.stop(grace=5).wait()
        catalog.close()
