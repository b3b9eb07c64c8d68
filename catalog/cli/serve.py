"""``loracat serve``: run the catalog server, configured by options or LORACAT_* variables."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import click

from catalog.cli.common import parse_bytes
from catalog.cli.exit_codes import UNAVAILABLE, fail
from catalog.errors import InvalidArgument

DEFAULT_ROOT = Path.home() / ".loracat"


def check_port_free(host: str, port: int, option: str) -> None:
    """Exit with one line (status 6) when ``host:port`` cannot be listened on, before the
    catalog opens anything. Port 0 (pick one) always passes."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        fail(f"{option}: cannot resolve host {host!r}: {exc.strerror}", UNAVAILABLE)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As gRPC binds: a port whose last connections sit in TIME_WAIT (a restart within a
        # minute) is free to listen on; one with a listener is still refused.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            why = "it is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            fail(f"cannot listen on {host}:{port} ({option}): {why}", UNAVAILABLE)


@click.command(context_settings={"show_default": True})
@click.option(
    "--root",
    envvar="LORACAT_ROOT",
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_ROOT,
    show_default=True,
    help="Directory for the LMDB index, spool and (by default) the file store.",
)
@click.option(
    "--store",
    "store_url",
    envvar="LORACAT_STORE",
    show_envvar=True,
    default=None,
    help="Durable store URL (file://..., s3://bucket/prefix).",
)
@click.option(
    "--host", envvar="LORACAT_HOST", show_envvar=True, default="127.0.0.1", show_default=True
)
@click.option(
    "--port",
    envvar="LORACAT_PORT",
    show_envvar=True,
    default=7070,
    show_default=True,
    type=click.IntRange(0, 65535),
)
@click.option(
    "--cache-dir",
    envvar="LORACAT_CACHE_DIR",
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="NVMe pack cache directory (default: ROOT/cache).",
)
@click.option(
    "--cache-bytes",
    envvar="LORACAT_CACHE_BYTES",
    show_envvar=True,
    default=str(8 << 30),
    show_default=True,
    help="NVMe pack cache budget in bytes (suffixes K, M, G, T; 0 disables the cache).",
)
@click.option(
    "--cache-policy",
    envvar="LORACAT_CACHE_POLICY",
    show_envvar=True,
    default="default",
    show_default=True,
    help="Eviction policy of the NVMe cache (see `loracat cache policies`).",
)
@click.option(
    "--metrics-port",
    envvar="LORACAT_METRICS_PORT",
    show_envvar=True,
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve Prometheus /metrics.",
)
@click.option(
    "--max-workers",
    envvar="LORACAT_MAX_WORKERS",
    show_envvar=True,
    default=32,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Threads serving writes, fetches and other calls that may wait on the store "
    "(index reads run on the event loop).",
)
@click.option(
    "--max-hint-watchers",
    envvar="LORACAT_MAX_HINT_WATCHERS",
    show_envvar=True,
    default=256,
    show_default=True,
    type=click.IntRange(0, 65536),
    help="Engines that may hold a WatchHints stream at once (each holds a thread).",
)
@click.option(
    "--request-record",
    "record_requests",
    envvar="LORACAT_REQUEST_RECORD",
    show_envvar=True,
    default=100_000,
    show_default=True,
    type=click.IntRange(0, 100_000_000),
    help="Resolves and fetches kept for `loracat trace export` (0: keep none).",
)
@click.option(
    "--digest",
    "digest_algorithm",
    envvar="LORACAT_DIGEST",
    show_envvar=True,
    type=click.Choice(["sha256", "blake3"]),
    default="sha256",
    show_default=True,
    help="Digest that identifies new revisions; every pack read is checked against it "
    "(blake3 hashes ~3x faster, which shows when fetching large packs).",
)
@click.option(
    "--auth",
    "auth_file",
    envvar="LORACAT_AUTH",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML file of principals (token hashes, tenants, roles); SIGHUP reloads it.",
)
@click.option(
    "--audit-log",
    envvar="LORACAT_AUDIT_LOG",
    show_envvar=True,
    default=None,
    help="Write one JSON line per write-side call here ('-': stderr).",
)
@click.option(
    "--tls-cert",
    envvar="LORACAT_SERVE_TLS_CERT",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
)
@click.option(
    "--tls-key",
    envvar="LORACAT_SERVE_TLS_KEY",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
)
@click.option(
    "--tls-client-ca",
    envvar="LORACAT_TLS_CLIENT_CA",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CA (PEM) that client certificates must be signed by: mutual TLS.",
)
@click.option(
    "--insecure",
    envvar="LORACAT_INSECURE",
    show_envvar=True,
    is_flag=True,
    help="Allow a non-loopback --host without --auth (anyone could then write).",
)
@click.option(
    "--access-log",
    envvar="LORACAT_ACCESS_LOG",
    show_envvar=True,
    is_flag=True,
    help="Log one line per RPC (method, peer, status code, milliseconds) on stderr.",
)
@click.option(
    "--peft-export-root",
    envvar="LORACAT_PEFT_EXPORT_ROOT",
    show_envvar=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Colocated engines (the vLLM plugin) may ask the catalog to write PEFT directories "
    "into directories they made under this one (their node cache), instead of streaming "
    "the packs to them. Default: nowhere.",
)
@click.option(
    "--push-warm-files",
    envvar="LORACAT_PUSH_WARM_FILES",
    show_envvar=True,
    default=2,
    show_default=True,
    type=click.IntRange(0, 64),
    help="Files the push inbox keeps ready, their pages already in the page cache, for "
    "colocated clients to write their next push over (0: none; clients then write new "
    "files). Sized after the largest recent push; each takes that much disk.",
)
@click.option(
    "--push-warm-max-bytes",
    envvar="LORACAT_PUSH_WARM_MAX_BYTES",
    show_envvar=True,
    default="256M",
    show_default=True,
    help="Largest capacity of a warm inbox file (suffixes K, M, G); a larger push writes "
    "its tail into new pages.",
)
def serve(
    root: Path,
    store_url: str | None,
    host: str,
    port: int,
    cache_dir: Path | None,
    cache_bytes: str,
    cache_policy: str,
    metrics_port: int | None,
    max_workers: int,
    max_hint_watchers: int,
    record_requests: int,
    digest_algorithm: str,
    auth_file: Path | None,
    audit_log: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    insecure: bool,
    access_log: bool,
    peft_export_root: Path | None,
    push_warm_files: int,
    push_warm_max_bytes: str,
) -> None:
    """Run the catalog server. Every option can also come from its LORACAT_* variable.

    Start-up failures (a busy port, a bad option, an unreadable file) are one line on stderr
    and the exit statuses of `catalog.cli.exit_codes`.
    """
    import logging

    from catalog.cache.policies import resolve_policy_name
    from catalog.service.server import serve_forever
    from catalog.warm_inbox import WarmPolicy

    resolve_policy_name(cache_policy)
    warm_max_bytes = parse_bytes(push_warm_max_bytes)
    if warm_max_bytes < 1:
        raise InvalidArgument(
            f"--push-warm-max-bytes must be positive, not {push_warm_max_bytes!r}"
        )
    check_port_free(host, port, "--port")
    if metrics_port:
        check_port_free(host, metrics_port, "--metrics-port")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # grpc's C core logs a failed bind itself; the one line below says it instead
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        serve_forever(
            root,
            store_url,
            host=host,
            port=port,
            cache_dir=cache_dir,
            cache_bytes=parse_bytes(cache_bytes),
            cache_policy=cache_policy,
            metrics_port=metrics_port,
            max_workers=max_workers,
            max_hint_watchers=max_hint_watchers,
            record_requests=record_requests,
            digest_algorithm=digest_algorithm,
            auth_file=auth_file,
            audit_log=audit_log,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            insecure=insecure,
            access_log=access_log,
            peft_export_root=peft_export_root,
            warm_inbox=WarmPolicy(push_warm_files, warm_max_bytes),
        )
    except RuntimeError as exc:  # grpc's "Failed to bind": taken between the check and now
        if "bind" not in str(exc):
            raise
        fail(f"cannot listen on {host}:{port}: {exc}", UNAVAILABLE)
