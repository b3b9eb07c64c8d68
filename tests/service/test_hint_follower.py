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
