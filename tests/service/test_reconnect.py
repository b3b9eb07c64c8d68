"""A client whose catalog went away reaches it again soon after it is back.

gRPC's default reconnect backoff grows towards 120 s and fails calls fast meanwhile: after a
few seconds' outage, a restarted catalog stayed unreachable for seconds more (the vLLM plugin
answered 503 for a catalog that was up). ``catalog.client.requests.CHANNEL_OPTIONS`` caps it.
"""

from __future__ import annotations

import time

import pytest

from catalog.client import CatalogClient
from catalog.errors import Unavailable
from catalog.service.server import create_server, open_catalog
from tests.servers import free_port

OUTAGE_S = 6.0  # past gRPC's default backoff steps of 1, 1.6 and 2.56 s
RECONNECT_WITHIN_S = 2.5  # engine_plugin.vllm.runtime.RECONNECT_WAIT_S


def test_client_reconnects_soon_after_the_catalog_is_back(tmp_path, packs):
    address = f"127.0.0.1:{free_port()}"
    catalog = open_catalog(tmp_path / "root", None)
    server, _ = create_server(catalog, address)
    with CatalogClient(address, timeout=5.0) as client:
        client.push("acme/m", packs["qv-r4"])
        server.stop(grace=None).wait()
        ends = time.monotonic() + OUTAGE_S
        while time.monotonic() < ends:  # callers keep asking while it is down
            with pytest.raises(Unavailable):
                client.resolve("acme/m")
            time.sleep(0.2)
        server, _ = create_server(catalog, address)
        try:
            client.wait_ready(timeout=RECONNECT_WITHIN_S)
            assert client.resolve("acme/m").number == 1
        finally:
            server.stop(grace=None).wait()
            catalog.close()
