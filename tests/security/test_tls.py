"""TLS and mutual TLS: the server's certificate checked against a CA, client certificates
required when the server is given a client CA, and tokens over TLS."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from catalog.client import AsyncCatalogClient, CatalogClient
from catalog.core import Catalog
from catalog.errors import Unauthenticated, Unavailable
from catalog.service.auth import Authenticator, Guard
from catalog.service.server import CatalogServer, create_server, open_catalog
from catalog.service.tls import server_credentials
from tests.security.certs import Authority, Issued
from tests.security.conftest import TOKENS, auth_toml
from tests.servers import loracat_command, serve_subprocess


@dataclass(frozen=True)
class Pki:
    ca: Authority
    rogue: Authority  # a CA the server does not trust
    server: Issued
    client: Issued
    rogue_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory, "loracat-test-ca")
    rogue = Authority(directory, "rogue-ca")
    return Pki(
        ca,
        rogue,
        ca.issue("catalog", server=True),
        ca.issue("engine-1", server=False),
        rogue.issue("intruder", server=False),
    )


def _serve(
    root: Path, pki: Pki, *, mutual: bool, auth: Path | None = None
) -> tuple[Catalog, CatalogServer, str]:
    server_cert = pki.server
    ca = pki.ca
    catalog = open_catalog(root)
    credentials = server_credentials(
        server_cert.cert,
        server_cert.key,
        ca.cert if mutual else None,
    )
    guard = None if auth is None else Guard(Authenticator(auth))
    server, port = create_server(catalog, "127.0.0.1:0", credentials=credentials, guard=guard)
    return catalog, server, f"127.0.0.1:{port}"


@pytest.fixture
def tls_catalog(tmp_path: Path, pki: Pki) -> Iterator[str]:
    catalog, server, address = _serve(tmp_path / "root", pki, mutual=False)
    try:
        yield address
    finally:
        server.stop(grace=None).wait()
        catalog.close()


@pytest.fixture
def mtls_catalog(tmp_path: Path, pki: Pki) -> Iterator[str]:
    auth = tmp_path / "auth.toml"
    auth.write_text(auth_toml())
    catalog, server, address = _serve(tmp_path / "root", pki, mutual=True, auth=auth)
    try:
        yield address
    finally:
        server.stop(grace=None).wait()
        catalog.close()


def test_tls_with_the_right_ca_and_refused_otherwise(
    tls_catalog: str, pki: Pki, packs: dict[str, bytes]
) -> None:
    ca, rogue = pki.ca, pki.rogue
    with CatalogClient(f"grpcs://{tls_catalog}", tls_ca=ca.cert, timeout=5) as client:
        pushed = client.push("acme/tls", packs["qv-r4"]).revision
        assert client.fetch("acme/tls") == packs["qv-r4"]
        assert pushed.number == 1
    with CatalogClient(tls_catalog, timeout=5) as plain, pytest.raises(Unavailable):
        plain.resolve("acme/tls")
    with (
        CatalogClient(tls_catalog, tls_ca=rogue.cert, timeout=5) as fooled,
        pytest.raises(Unavailable),
    ):
        fooled.resolve("acme/tls")


def test_ca_from_the_environment(
    tls_catalog: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORACAT_TLS_CA", str(pki.ca.cert))
    with CatalogClient(f"grpcs://{tls_catalog}", timeout=5) as client:
        assert client.stats()["revisions"] == 0


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_catalog: str, pki: Pki) -> None:
    ca, good, bad = pki.ca, pki.client, pki.rogue_client

    def client(cert: Issued | None) -> CatalogClient:
        return CatalogClient(
            mtls_catalog,
            token=TOKENS["read"],
            tls_ca=ca.cert,
            tls_cert=cert and cert.cert,
            tls_key=cert and cert.key,
            timeout=5,
        )

    with client(None) as anonymous, pytest.raises(Unavailable):
        anonymous.stats()
    with client(bad) as intruder, pytest.raises(Unavailable):
        intruder.stats()
    with client(good) as engine:
        assert engine.stats()["store_url"] == "file://"
    # the certificate gets the caller onto the wire; the token still decides what it may do
    with (
        CatalogClient(
            mtls_catalog, tls_ca=ca.cert, tls_cert=good.cert, tls_key=good.key
        ) as no_token,
        pytest.raises(Unauthenticated),
    ):
        no_token.stats()


def test_async_client_over_mutual_tls_with_a_token(mtls_catalog: str, pki: Pki) -> None:
    ca, good = pki.ca, pki.client

    async def main() -> int:
        async with AsyncCatalogClient(
            f"grpcs://{mtls_catalog}",
            token=TOKENS["read"],
            tls_ca=ca.cert,
            tls_cert=good.cert,
            tls_key=good.key,
        ) as client:
            page = await client.list_adapters()
            return len(page.items)

    assert asyncio.run(main()) == 0


def test_serve_and_cli_over_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    ca, server_cert, good = pki.ca, pki.server, pki.client
    tls_args = ["--tls-ca", str(ca.cert), "--tls-cert", str(good.cert), "--tls-key", str(good.key)]
    serve_args = [
        "--tls-cert", str(server_cert.cert),
        "--tls-key", str(server_cert.key),
        "--tls-client-ca", str(ca.cert),
    ]  # fmt: skip
    client_options = {"tls_ca": ca.cert, "tls_cert": good.cert, "tls_key": good.key}
    with serve_subprocess(
        tmp_path / "root", extra_args=serve_args, client_options=client_options
    ) as (
        _,
        address,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORACAT_")}
        base = [*loracat_command(), "cache", "stats", "--json", "--server", f"grpcs://{address}"]
        ok = subprocess.run(
            [*base, *tls_args], capture_output=True, text=True, env=env, timeout=120
        )
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run(
            [*base, "--tls-ca", str(ca.cert)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert refused.returncode != 0 and "unavailable" in refused.stderr
