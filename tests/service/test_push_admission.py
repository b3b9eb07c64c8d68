"""A push admits the pack it commits to the NVMe tier (``catalog.cache.admission``), through
the real gRPC service: the first fetch of a new revision is a tier hit, with no durable read."""

from __future__ import annotations

import pytest

from catalog.errors import InvalidArgument


def tier(stats, name):  # type: ignore[no-untyped-def]
    return next(t for t in stats["tiers"] if t["tier"] == name)


def test_the_first_fetch_after_a_push_is_a_tier_hit(client, packs):  # type: ignore[no-untyped-def]
    client.push("acme/adm", packs["all-r8"])
    stats = client.stats()
    assert stats["counters"]["nvme_admitted_at_push"] == 1
    nvme = tier(stats, "nvme")
    assert (nvme["entries"], nvme["hits"], nvme["misses"]) == (1, 0, 0)
    assert client.fetch("acme/adm") == packs["all-r8"]
    stats = client.stats()
    nvme = tier(stats, "nvme")
    assert (nvme["hits"], nvme["misses"]) == (1, 0)
    assert stats["counters"].get("durable_reads", 0) == 0
    # A push of bytes the adapter has already (a retry) admits nothing again.
    assert not client.push("acme/adm", packs["all-r8"]).created
    assert client.stats()["counters"]["nvme_admitted_at_push"] == 1


def test_a_refused_push_admits_nothing(client, packs):  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument):
        client.push("acme/bad", packs["qv-r4"], base_id="another-base")
    assert client.list_cache() == []
    assert client.stats()["counters"]["nvme_admitted_at_push"] == 0
