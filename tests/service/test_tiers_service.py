"""The NVMe tier, prefetch, hints and metrics through the real gRPC service."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest

from catalog.errors import FailedPrecondition, InvalidArgument, NotFound
from catalog.service.metrics import start_metrics_server
from tests.servers import loracat_command


def tier(stats, name):  # type: ignore[no-untyped-def]
    return next(t for t in stats["tiers"] if t["tier"] == name)


def test_second_fetch_is_an_nvme_hit(client, packs):
    client.push("acme/n", packs["all-r8"])
    client.evict_pack("acme/n")  # the push admitted it to the tier: start cold
    client.fetch("acme/n")
    first = tier(client.stats(), "nvme")
    assert (first["hits"], first["misses"], first["entries"]) == (0, 1, 1)
    assert client.fetch("acme/n") == packs["all-r8"]
    assert client.fetch("acme/n", offset=10, length=100) == packs["all-r8"][10:110]
    second = tier(client.stats(), "nvme")
    assert second["hits"] == 2 and second["misses"] == 1
    assert tier(client.stats(), "durable")["misses"] == 1  # one durable read in all


def test_pin_unpin_evict_and_ls(client, packs):
    rev = client.push("acme/p", packs["qv-r4"]).revision
    client.pin_pack("acme/p")
    [entry] = client.list_cache()
    assert entry["digest"] == str(rev.digest) and entry["pins"] == 1
    with pytest.raises(FailedPrecondition):
        client.evict_pack("acme/p")  # pinned
    client.unpin_pack("acme/p")
    client.evict_pack("acme/p")
    assert client.list_cache() == []
    with pytest.raises(NotFound):
        client.evict_pack("acme/p")


def test_gc_drops_cached_copies_of_deleted_packs(client, packs):
    client.push("acme/g", packs["qv-r4"])
    client.push("acme/g", packs["down-r2"])
    client.fetch("acme/g@1")
    client.delete("acme/g@1")
    client.gc()
    # Both were admitted to the tier by their push; the live one stays.
    assert [e["size_bytes"] for e in client.list_cache()] == [len(packs["down-r2"])]


def test_prefetch_reports_each_reference(client, packs):
    client.push("acme/w1", packs["qv-r4"])
    client.push("acme/w2", packs["all-r8"])
    progress = {
        p.ref: p for p in client.prefetch(["acme/w1", "acme/w2@1", "acme/none"], priority=5)
    }
    assert progress["acme/w1"].state == "done" and progress["acme/w1"].size_bytes == len(
        packs["qv-r4"]
    )
    assert progress["acme/w2@1"].state == "done"
    assert progress["acme/none"].state == "failed" and "NotFound" in progress["acme/none"].error
    assert tier(client.stats(), "nvme")["entries"] == 2
    with pytest.raises(InvalidArgument):
        list(client.prefetch([]))


def test_prefetch_honours_priority_and_deadline(tmp_path, packs):
    from catalog.prefetch import PrefetchQueue

    started = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def warm(ref: str) -> tuple[str, int]:
        if ref == "blocker":
            started.set()
            release.wait(10)
        order.append(ref)
        return "sha256:" + "0" * 64, 1

    queue = PrefetchQueue(warm, workers=1)
    try:
        blocker = queue.submit(["blocker"])
        assert started.wait(10)
        low = queue.submit(["low"], priority=0)
        high = queue.submit(["high"], priority=9)
        late = queue.submit(["late"], priority=99, deadline_s=0.001)
        time.sleep(0.01)  # let the deadline pass (not a readiness wait): nothing can start it
        release.set()
        results = {p.ref: p.state for it in (blocker, low, high, late) for p in it}
    finally:
        queue.close()
    assert results == {"blocker": "done", "low": "done", "high": "done", "late": "cancelled"}
    assert order == ["blocker", "high", "low"]


def test_serving_move_sends_an_attach_hint_to_engines(client, served, packs):
    client.push("acme/h", packs["qv-r4"])
    rev2 = client.push("acme/h", packs["all-r8"]).revision
    client.register_engine("engine-a", "tiny-llama-test", 8, 16)
    hints = []
    stream = client.watch_hints("engine-a")
    got = threading.Event()

    def consume() -> None:
        for hint in stream:
            hints.append(hint)
            got.set()
            return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    # The subscription is registered when the server starts streaming; retry the move until seen.
    for number in (1, 2) * 20:
        client.set_alias("acme/h", "serving", number)
        if got.wait(0.5):
            break
    assert hints and hints[0].kind == "attach"
    assert hints[0].ref in ("acme/h@1", f"acme/h@{rev2.number}")
    assert "serving" in hints[0].reason


def test_demand_hints_skip_what_the_engine_holds(served, client, packs):
    a = client.push("acme/d1", packs["qv-r4"]).revision
    b = client.push("acme/d2", packs["all-r8"]).revision
    for _ in range(3):
        client.fetch("acme/d1")
    client.fetch("acme/d2")
    client.register_engine("engine-d", "tiny-llama-test", 8, 16)
    client.report_residency("engine-d", gpu=[str(a.digest)], host=[])
    received = []
    sub = served.catalog.hints.subscribe("engine-d", "tiny-llama-test", stop=lambda: bool(received))
    # Subscribing happens lazily on first next(); publish from a thread once it waits.
    thread = threading.Thread(target=lambda: received.extend([next(sub)]), daemon=True)
    thread.start()
    while served.catalog.hints.subscribers() == 0:
        thread.join(0.01)
    assert served.catalog.publish_demand_hints() == 1
    thread.join(10)
    assert [h.ref for h in received] == [f"acme/d2@{b.number}"]
    assert received[0].kind == "stage"


def test_engine_tier_counters_are_summed_and_checked(client, packs):
    a = client.push("acme/t1", packs["qv-r4"]).revision
    for engine_id in ("engine-x", "engine-y"):
        client.register_engine(engine_id, "tiny-llama-test", 4, 16)
        client.report_residency(
            engine_id,
            gpu=[str(a.digest)],
            host=[str(a.digest)],
            tiers=[
                {"tier": "gpu", "bytes": 100, "hits": 3, "misses": 1, "bytes_in": 100},
                {"tier": "host", "bytes": 40, "capacity_bytes": 1000, "evictions": 2},
            ],
        )
    stats = client.stats()
    gpu, host = tier(stats, "gpu"), tier(stats, "host")
    # One revision held by two engines is one entry; the engines' counters add up.
    assert (gpu["entries"], gpu["bytes"], gpu["hits"], gpu["misses"]) == (1, 200, 6, 2)
    assert (host["bytes"], host["capacity_bytes"], host["evictions"]) == (80, 2000, 4)
    with pytest.raises(InvalidArgument, match="nvme"):
        client.report_residency("engine-x", gpu=[], host=[], tiers=[{"tier": "nvme"}])
    # The refused report changed nothing.
    assert tier(client.stats(), "gpu")["bytes"] == 200


def test_without_a_cache_pins_are_refused(tmp_path, packs):
    from catalog.service.server import create_server, open_catalog

    catalog = open_catalog(tmp_path / "root", cache_bytes=0)
    server, port = create_server(catalog)
    try:
        from catalog.client import CatalogClient

        with CatalogClient(f"127.0.0.1:{port}") as c:
            c.push("acme/nc", packs["qv-r4"])
            assert c.fetch("acme/nc") == packs["qv-r4"]
            with pytest.raises(FailedPrecondition, match="without an NVMe pack cache"):
                c.pin_pack("acme/nc")
    finally:
        server.stop(None).wait()
        catalog.close()


def test_metrics_endpoint_exposes_tiers(served, client, packs):
    client.push("acme/m", packs["qv-r4"])
    client.evict_pack("acme/m")  # the push admitted it to the tier: start cold
    client.fetch("acme/m")
    from prometheus_client import REGISTRY

    port = start_metrics_server(served.catalog, "127.0.0.1", 0)
    try:
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    finally:
        for collector in list(REGISTRY._collector_to_names):  # the collector is per catalog
            if type(collector).__name__ == "CatalogCollector":
                REGISTRY.unregister(collector)
    assert 'loracat_tier_entries{tier="nvme"} 1.0' in body
    assert 'loracat_tier_misses_total{tier="nvme"} 1.0' in body
    assert "loracat_rpc_seconds_bucket" in body
    assert "loracat_revisions 1.0" in body


def test_cache_simulate_cli_json(tmp_path):
    trace = tmp_path / "trace.txt"
    lines = [f"t/a{i % 7}@1 {1000 + i % 7}" for i in range(300)]
    trace.write_text("# comment\n" + "\n".join(lines) + "\n")
    proc = subprocess.run(
        [
            *loracat_command(),
            "cache",
            "simulate",
            "--trace",
            str(trace),
            "--policy",
            "lru",
            "--capacity-bytes",
            "3000",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["policy"] == "lru"
    for key in ("hit_rate", "byte_hit_rate"):
        assert 0 <= result[key] <= 1
        assert 0 <= result["lru"][key] <= 1 and 0 <= result["belady"][key] <= 1
    assert result["belady"]["hit_rate"] >= result["hit_rate"]
    bad = tmp_path / "bad.txt"
    bad.write_text("t/a@1 12\nnot a line\n")
    proc = subprocess.run(
        [
            *loracat_command(),
            "cache",
            "simulate",
            "--trace",
            str(bad),
            "--policy",
            "default",
            "--capacity-bytes",
            "1M",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "line 2" in proc.stderr
