"""An engine follows the catalog's hints over real gRPC: serving moves attach, demand stages."""

from __future__ import annotations

import copy

from engine_plugin import ResidentEngine
from engine_plugin.hints import HintFollower
from tests.service.conftest import BASE_ID


def test_engine_follows_serving_moves_and_demand(served, client, packs, base_model):
    first = client.push("acme/f", packs["qv-r4"]).revision
    second = client.push("acme/f", packs["all-r8"]).revision
    hot = client.push("acme/hot", packs["down-r2"]).revision
    engine = ResidentEngine(
        copy.deepcopy(base_model), catalog=client, num_slots=4, max_rank=8, base_id=BASE_ID
    )
    follower = HintFollower(engine, client)
    try:
        # The stream subscribes when the server starts it; move the alias until a hint lands.
        for number in [first.number, second.number] * 10:
            client.set_alias("acme/f", "serving", number)
            if follower.wait_for(1, 0.5):
                break
        assert follower.counters["attach"] >= 1
        resident = {r["ref"] for r in engine.stats()["resident"]}
        assert resident & {f"acme/f@{first.number}", f"acme/f@{second.number}"}

        for _ in range(5):
            client.fetch("acme/hot")
        handled = sum(follower.counters[k] for k in ("attach", "stage", "failed"))
        assert served.catalog.publish_demand_hints() >= 1
        assert follower.wait_for(handled + 1, 10)
        assert follower.counters["stage"] >= 1
        engine.prefetch(["acme/hot"])[0].result(10)  # the staged copy is ready (no refetch)
        engine.flush_reports()
        [record] = served.catalog.engines()
        assert str(hot.digest) in record.host
    finally:
        follower.close()
        engine.close()


def test_a_follower_refused_by_a_full_server_retries_until_a_watcher_leaves(
    tmp_path, packs, base_model
):
    from catalog.client import CatalogClient
    from catalog.service.server import create_server, open_catalog

    catalog = open_catalog(tmp_path / "root", cache_bytes=0)
    server, port = create_server(catalog, max_hint_watchers=1)
    client = CatalogClient(f"127.0.0.1:{port}")
    engines = [
        ResidentEngine(
            copy.deepcopy(base_model), catalog=client, num_slots=2, max_rank=8, base_id=BASE_ID
        )
        for _ in range(2)
    ]
    first = HintFollower(engines[0], client, reconnect_s=0.05)
    second = None
    try:
        while catalog.hints.subscribers() == 0:
            first._stop.wait(0.01)
        second = HintFollower(engines[1], client, reconnect_s=0.05)
        while second.counters["refused"] == 0:  # the one watcher thread is taken
            second._stop.wait(0.01)
        assert second._thread.is_alive()
        first.close()
        client.push("acme/w", packs["qv-r4"])
        for _ in range(200):  # the freed thread goes to the retrying follower
            client.set_alias("acme/w", "serving", 1)
            if second.wait_for(1, 0.1):
                break
            client.set_alias("acme/w", "serving", 0)
        assert second.counters["attach"] >= 1
    finally:
        for follower in (first, second):
            if follower is not None:
                follower.close()
        for engine in engines:
            engine.close()
        client.close()
        server.stop(None)
        catalog.close()
