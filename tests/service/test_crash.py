"""SIGKILL the server in the middle of pushes: the catalog stays consistent and reindexable."""

from __future__ import annotations

import shutil
import signal
import threading

import pytest

from catalog.client import CatalogClient
from catalog.errors import CatalogError
from catalog.pack import read_pack, write_pack
from tests.servers import serve_subprocess


def variants(pack_bytes: bytes, count: int) -> list[bytes]:
    """Distinct valid packs (distinct digests) from one: only the base_id differs."""
    pack = read_pack(pack_bytes)
    tensors = {name: pack.tensor(name) for name in pack.tensor_names()}
    return [write_pack(pack.manifest.with_base_id(f"base-{i}"), tensors) for i in range(count)]


def snapshot(client: CatalogClient) -> list[dict]:  # type: ignore[type-arg]
    return [s.to_json() for s in client.iter_adapters()]


# On the server's host a push names a file in its inbox (catalog.local_push); colocated=False
# streams it: both must leave every acknowledged push behind them.
@pytest.mark.parametrize("colocated", [True, False], ids=["inbox", "stream"])
def test_sigkill_mid_push_then_restart_and_reindex(tmp_path, packs, colocated):
    root = tmp_path / "root"
    payloads = variants(packs["all-r8"], 200)
    acknowledged: list[tuple[str, int, bytes]] = []
    enough = threading.Event()

    with serve_subprocess(root) as (proc, address):
        client = CatalogClient(address, colocated=colocated)

        def pusher() -> None:
            for i, data in enumerate(payloads):
                try:
                    rev = client.push(
                        f"acme/a{i % 7}", data, aliases=["serving"] if i % 3 == 0 else ()
                    ).revision
                except CatalogError:
                    return  # the server died under us
                acknowledged.append((str(rev.adapter), rev.number, data))
                if len(acknowledged) >= 25:
                    enough.set()

        thread = threading.Thread(target=pusher, daemon=True)
        thread.start()
        assert enough.wait(120), "pushes did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        thread.join(60)
        client.close()

    assert 25 <= len(acknowledged) < len(payloads)

    with serve_subprocess(root) as (_, address), CatalogClient(address) as client:
        # Every acknowledged push survived, with its exact bytes.
        for name, number, data in acknowledged:
            assert client.fetch(f"{name}@{number}") == data
        # Every visible revision can be read, and the whole store verifies.
        for summary in client.iter_adapters():
            for rev in client.iter_revisions(summary.adapter):
                client.fetch(rev)
        assert client.verify()["problems"] == []
        before = snapshot(client)
        client.reindex()
        assert snapshot(client) == before

    # A fresh index rebuilt from the durable tier alone matches as well.
    shutil.rmtree(root / "index")
    with serve_subprocess(root) as (_, address), CatalogClient(address) as client:
        assert snapshot(client) == before
