"""Catalogs served with ``--auth``: principals of every role, and a second tenant to attack."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.service.auth import Authenticator, Guard, token_sha256
from catalog.service.server import create_server, open_catalog
from tests.service.conftest import BASE_ID, adapter_dirs, base_model, packs  # noqa: F401

#: role -> token; every one of them reaches tenants "acme" and "acme-*" only, except root.
TOKENS = {
    "read": "tok-read-1f0c",
    "write": "tok-write-77aa",
    "engine": "tok-engine-c3d2",
    "admin": "tok-admin-9b1e",
}
ROOT_TOKEN = "tok-root-5e5e"  # admin of every tenant: sets the scene


def auth_toml(tokens: dict[str, str] = TOKENS, root_token: str | None = ROOT_TOKEN) -> str:
    parts = [
        f'[[principal]]\nname = "{role}-user"\ntoken_sha256 = "{token_sha256(token)}"\n'
        f'tenants = ["acme", "acme-*"]\nrole = "{role}"\n'
        for role, token in tokens.items()
    ]
    if root_token:
        parts.append(
            f'[[principal]]\nname = "root"\ntoken_sha256 = "{token_sha256(root_token)}"\n'
            'tenants = ["*"]\nrole = "admin"\n'
        )
    return "\n".join(parts)


@dataclass
class AuthCatalog:
    address: str
    root: Path
    auth_file: Path
    authenticator: Authenticator

    def client(self, token: str | None = None) -> CatalogClient:
        return CatalogClient(self.address, token=token)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def auth_catalog(tmp_path_factory: pytest.TempPathFactory, packs) -> Iterator[AuthCatalog]:  # noqa: F811
    """A catalog with ``acme/own`` and ``victim/other`` (one revision each, alias ``serving``)."""
    root = tmp_path_factory.mktemp("auth")
    auth_file = _write(root / "auth.toml", auth_toml())
    authenticator = Authenticator(auth_file)
    catalog = open_catalog(root / "catalog")
    server, port = create_server(catalog, "127.0.0.1:0", guard=Guard(authenticator))
    address = f"127.0.0.1:{port}"
    with CatalogClient(address, token=ROOT_TOKEN) as root_client:
        for name, key in (("acme/own", "qv-r4"), ("victim/other", "down-r2")):
            root_client.push(name, packs[key], aliases=["serving"])
    try:
        yield AuthCatalog(address, root, auth_file, authenticator)
    finally:
        server.stop(grace=None).wait()
        catalog.close()
