"""The catalog over a real S3 server (SeaweedFS): round trips and reindex from S3 alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from catalog.client import CatalogClient
from tests.servers import loracat_command, running_catalog, serve_subprocess

pytestmark = pytest.mark.s3


def listing(client: CatalogClient) -> list[dict]:  # type: ignore[type-arg]
    return [s.to_json() for s in client.iter_adapters()]


def test_s3_roundtrip_and_reindex_from_a_fresh_index(tmp_path, s3_store_url, packs):
    with running_catalog(tmp_path / "a", s3_store_url) as served, served.client() as client:
        client.push("acme/s3", packs["qv-r4"])
        client.push("acme/s3", packs["all-r8"], aliases=["serving"])
        client.push("beta/s3", packs["down-r2"])
        client.delete("beta/s3@1")
        client.push("beta/s3", packs["qv-r4"])
        assert client.fetch("acme/s3@serving") == packs["all-r8"]
        before = listing(client)
        revisions = [r.to_json() for r in client.iter_revisions("acme/s3")]
        history = [m.to_json() for m in client.alias_history("acme/s3")]
        assert client.verify()["problems"] == []

    # A different machine: nothing local, only the bucket.
    with running_catalog(tmp_path / "b", s3_store_url) as served, served.client() as client:
        assert listing(client) == before
        assert [r.to_json() for r in client.iter_revisions("acme/s3")] == revisions
        assert [m.to_json() for m in client.alias_history("acme/s3")] == history
        assert client.fetch("acme/s3@1") == packs["qv-r4"]
        result = client.reindex()
        assert (result["adapters"], result["revisions"]) == (2, 3)
        assert listing(client) == before


def test_cli_serve_on_s3_then_reindex(tmp_path, s3_store_url, seaweedfs, adapter_dirs):
    env = {**os.environ, **seaweedfs.env()}
    env.pop("AWS_ENDPOINT_URL", None)
    root = tmp_path / "root"

    def cli(address: str, *args: str) -> str:
        proc = subprocess.run(
            [*loracat_command(), *args],
            capture_output=True,
            text=True,
            env={**env, "LORACAT_SERVER": address},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    with serve_subprocess(root, s3_store_url, env=seaweedfs.env()) as (_, address):
        cli(
            address,
            "push",
            str(adapter_dirs["qv-r4"]),
            "acme/cli",
            "--base",
            "b",
            "--alias",
            "serving",
        )
        cli(address, "push", str(adapter_dirs["all-r8"]), "acme/cli", "--base", "b")
        before = json.loads(cli(address, "ls", "--json"))
    shutil.rmtree(root / "index")
    with serve_subprocess(root, s3_store_url, env=seaweedfs.env()) as (_, address):
        assert json.loads(cli(address, "ls", "--json")) == before
        assert "reindexed 1 adapter(s), 2 revision(s)" in cli(address, "reindex")
        assert json.loads(cli(address, "ls", "--json")) == before
