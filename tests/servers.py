"""Real catalog servers for tests: in-process on port 0, or as a `loracat serve` subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.client import CatalogClient
from catalog.core import Catalog
from catalog.service.server import create_server, open_catalog


@dataclass
class RunningCatalog:
    catalog: Catalog
    address: str
    root: Path

    def client(self) -> CatalogClient:
        return CatalogClient(self.address)


@contextmanager
def running_catalog(root: Path, store_url: str | None = None) -> Iterator[RunningCatalog]:
    """The catalog under ``root`` served over real gRPC on a free loopback port."""
    catalog = open_catalog(root, store_url)
    server, port = create_server(catalog, "127.0.0.1:0")
    try:
        yield RunningCatalog(catalog, f"127.0.0.1:{port}", root)
    finally:
        server.stop(grace=None).wait()
        catalog.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loracat_command() -> list[str]:
    """The `loracat` console script of this environment (falls back to the module)."""
    script = Path(sys.executable).with_name("loracat")
    return [str(script)] if script.exists() else [sys.executable, "-m", "catalog.cli.main"]


@contextmanager
def serve_subprocess(
    root: Path,
    store_url: str | None = None,
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    client_options: dict[str, Any] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`loracat serve` (plus ``extra_args``) in a child process; yields (process, address) once
    it answers health (asked with a ``CatalogClient(address, **client_options)``: a token or
    TLS files for a server started with ``--auth`` or ``--tls-*``)."""
    port = free_port()
    args = [*loracat_command(), "serve", "--root", str(root), "--port", str(port), *extra_args]
    if store_url:
        args += ["--store", store_url]
    log = open(root.parent / f"serve-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    address = f"127.0.0.1:{port}"
    try:
        with CatalogClient(address, **(client_options or {})) as client:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"loracat serve exited with {proc.returncode}: "
                        + (root.parent / f"serve-{port}.log").read_text()[-2000:]
                    )
                try:
                    client.wait_ready(timeout=0.5)
                    client.stats()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
