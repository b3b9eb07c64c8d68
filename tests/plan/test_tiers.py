"""The tier model against a request-by-request simulation of the hierarchy with the real LRU
policy objects: GPU slots and host bytes per engine, one NVMe cache, warm-up not counted."""

from __future__ import annotations

import numpy as np
import pytest

from catalog.cache.policies import LRU, EvictionPolicy
from catalog.errors import InvalidArgument
from catalog.plan.profile import DEFAULT_PROFILE
from catalog.plan.tiers import SERVED_FROM, Configuration, TierModel
from catalog.plan.workload import Workload, synthetic_workload


def _lookup(policy: EvictionPolicy, key: str, size: int) -> bool:
    """One request through a cache: True on a hit (the catalog.cache.replay protocol)."""
    if key in policy:
        policy.record_hit(key)
        return True
    if policy.admit(key, size):
        policy.victims(size)
        policy.record_insert(key, size)
    return False


def _simulate(workload: Workload, configuration: Configuration, engines: int) -> list[int]:
    gpu = [LRU(configuration.gpu_slots) for _ in range(engines)]
    host = [LRU(configuration.host_bytes) for _ in range(engines)]
    nvme = LRU(configuration.nvme_bytes)
    served = []
    for key_id in workload.ids.tolist():
        key, size = workload.keys[key_id], int(workload.key_sizes[key_id])
        engine = key_id % engines
        if _lookup(gpu[engine], key, 1):
            served.append(0)
        elif _lookup(host[engine], key, size):
            served.append(1)
        elif _lookup(nvme, key, size):
            served.append(2)
        else:
            served.append(3)
    return served[workload.warmup :]


@pytest.mark.parametrize("engines", [1, 3])
def test_every_request_is_served_where_the_real_policies_put_it(engines: int) -> None:
    workload = synthetic_workload(
        adapters=300, zipf=0.9, rate=10, duration_s=400, shift_every_s=150, seed=5
    ).warmed()
    catalog = workload.catalog_bytes
    model = TierModel(workload, engines=engines, profile=DEFAULT_PROFILE)
    for configuration in (
        Configuration(4, catalog // 50, catalog // 6),
        Configuration(16, catalog // 12, catalog // 3),
        Configuration(1, int(workload.key_sizes.max()), catalog),
    ):
        outcome = model.evaluate(configuration)
        expected = _simulate(workload, configuration, engines)
        assert outcome.tier.tolist() == expected
        counts = np.bincount(expected, minlength=4)
        assert outcome.hits["gpu"] == counts[0] and outcome.lookups["host"] == sum(counts[1:])
        # Each tier does some of the work in these configurations.
        assert all(counts[:3]), dict(zip(SERVED_FROM, counts.tolist(), strict=True))


def test_delays_follow_the_profile() -> None:
    workload = synthetic_workload(adapters=50, zipf=1.0, rate=10, duration_s=100, seed=1)
    model = TierModel(workload, engines=1, profile=DEFAULT_PROFILE)
    outcome = model.evaluate(Configuration(2, 10**9, 10**12))
    delays = DEFAULT_PROFILE.tier_delays(workload.sizes)
    for index, tier in enumerate(SERVED_FROM):
        chosen = outcome.tier == index
        assert np.allclose(outcome.delay_s[chosen], delays[tier][chosen])
    assert outcome.delay_s[outcome.tier == 0].max(initial=0.0) == 0.0


@pytest.mark.parametrize("field", ["gpu_slots", "host_bytes", "nvme_bytes"])
@pytest.mark.parametrize("value", [0, -1])
def test_a_configuration_refuses_zero_and_negative(field: str, value: int) -> None:
    values = {"gpu_slots": 1, "host_bytes": 1, "nvme_bytes": 1, field: value}
    with pytest.raises(InvalidArgument, match=field):
        Configuration(**values)
