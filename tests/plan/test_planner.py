"""The plan document: its JSON contract, the search, and bad input as clear statements."""

from __future__ import annotations

import json

import pytest

from catalog.cache.policies import POLICIES
from catalog.cli.common import parse_bytes
from catalog.errors import InvalidArgument
from catalog.plan.planner import (
    Costs,
    PlanRequest,
    build_plan,
    parse_capacities,
    parse_configuration,
)
from catalog.plan.profile import DEFAULT_PROFILE
from catalog.plan.workload import Workload, synthetic_workload


@pytest.fixture(scope="module")
def workload() -> Workload:
    return synthetic_workload(
        adapters=200, zipf=1.0, rate=20, duration_s=150, shift_every_s=60, seed=2
    )


def test_the_json_contract(workload: Workload) -> None:
    plan = build_plan(
        workload,
        PlanRequest(slo_p99_ms=60, min_gpu_hit=0.3, points=6, workers=1),
        DEFAULT_PROFILE,
    )
    json.dumps(plan)  # every figure is plain JSON
    assert plan["requests"] == workload.requests == 3000
    assert plan["adapters"] == workload.adapters
    assert set(plan["tiers"]) == {"gpu", "host", "nvme"}
    assert plan["tiers"]["gpu"]["unit"] == "slots"
    assert plan["tiers"]["host"]["unit"] == plan["tiers"]["nvme"]["unit"] == "bytes"
    for tier in plan["tiers"].values():
        curves = tier["curves"]
        assert {p["policy"] for p in curves} == {*POLICIES, "belady"}
        assert len(curves) == (len(POLICIES) + 1) * len(tier["capacities"])
        for point in curves:
            assert set(point) == {"policy", "capacity", "hit_rate", "byte_hit_rate"}
            assert 0 <= point["hit_rate"] <= 1 and 0 <= point["byte_hit_rate"] <= 1
    gpu = plan["tiers"]["gpu"]
    lru = [p["hit_rate"] for p in gpu["curves"] if p["policy"] == "lru"]
    assert lru == sorted(lru) and lru[-1] > lru[0]  # LRU's curve only rises
    belady = [p["hit_rate"] for p in gpu["curves"] if p["policy"] == "belady"]
    # With one slot per adapter (unit sizes) Belady's MIN is optimal: nothing beats it.
    for point in gpu["curves"]:
        assert point["hit_rate"] <= belady[gpu["capacities"].index(point["capacity"])] + 1e-12
    recommendation = plan["recommendation"]
    assert recommendation["met"] is True
    chosen = recommendation["configuration"]
    assert chosen["delay_ms"]["p99"] <= 60 and chosen["hit_rate"]["gpu"] >= 0.3


def test_costs_pick_the_cheapest_configuration_met(workload: Workload) -> None:
    request = PlanRequest(
        slo_p99_ms=60, points=6, workers=1, policies=["lru"], costs=Costs(10.0, 1.0, 0.01)
    )
    plan = build_plan(workload, request, DEFAULT_PROFILE)
    chosen = plan["recommendation"]["configuration"]
    assert plan["recommendation"]["met"] and chosen["cost"] > 0
    assert chosen["cost"] == pytest.approx(
        chosen["gpu_slots"] * 10
        + chosen["host_bytes"] / 2**30
        + chosen["nvme_bytes"] / 2**30 * 0.01
    )


def test_an_slo_nothing_meets_says_so_and_shows_the_closest(workload: Workload) -> None:
    plan = build_plan(
        workload,
        PlanRequest(
            slo_p99_ms=0.001, points=5, workers=1, policies=["lru"], capacities={"gpu": [1, 4]}
        ),
        DEFAULT_PROFILE,
    )
    recommendation = plan["recommendation"]
    assert recommendation["met"] is False
    assert (
        "no configuration in the searched range meets p99 <= 0.001 ms"
        in recommendation["statement"]
    )
    assert recommendation["configuration"]["label"] == "closest"
    assert recommendation["configuration"]["delay_ms"]["p99"] > 0.001


def test_an_unreachable_gpu_hit_rate_says_so(workload: Workload) -> None:
    plan = build_plan(
        workload,
        PlanRequest(
            min_gpu_hit=0.99,
            slo_p99_ms=50,
            points=4,
            workers=1,
            policies=["lru"],
            capacities={"gpu": [1, 2]},
        ),
        DEFAULT_PROFILE,
    )
    assert plan["recommendation"]["met"] is False
    assert (
        "no GPU slot count up to 2 reaches a GPU hit rate of 99.0%"
        in plan["recommendation"]["statement"]
    )


def test_compare_shows_configurations_side_by_side(workload: Workload) -> None:
    plan = build_plan(
        workload,
        PlanRequest(
            slo_p99_ms=60,
            points=4,
            workers=1,
            policies=["lru"],
            compare=[
                parse_configuration("8:1G:8G", parse_bytes),
                parse_configuration("64:4G:64G", parse_bytes),
            ],
        ),
        DEFAULT_PROFILE,
    )
    labels = [c["label"] for c in plan["configurations"]]
    assert labels == ["recommended", "compare 1", "compare 2"]
    small, large = plan["configurations"][1:]
    assert small["gpu_slots"] == 8 and large["host_bytes"] == 4 << 30
    assert large["hit_rate"]["gpu"] > small["hit_rate"]["gpu"]


def test_engines_from_rate_by_littles_law(workload: Workload) -> None:
    plan = build_plan(
        workload,
        PlanRequest(
            rate=100, rows_per_batch=16, request_s=2.0, points=3, workers=1, policies=["lru"]
        ),
        DEFAULT_PROFILE,
    )
    assert plan["engines"]["engines"] == 13  # 100 req/s x 2 s = 200 rows busy / 16 per batch


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["gpu=0"], "capacities must be positive, got 0"),
        (["gpu=-4"], "capacities must be positive, got -4"),
        (["host=-1G"], "is negative"),
        (["host=0"], "capacities must be positive, got 0"),
        (["ssd=1G"], "TIER gpu, host or nvme"),
        (["gpu="], "names no capacity"),
        (["gpu=two"], "is not a slot count"),
    ],
)
def test_bad_capacities_are_refused(entries: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_capacities(entries, parse_bytes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacities": {"gpu": [0]}}, "must be positive"),
        ({"policies": ["nope"]}, "unknown eviction policy"),
        ({"policies": []}, "names no policy"),
        ({"min_gpu_hit": 1.5}, "fraction"),
        ({"slo_p99_ms": -1.0}, ">= 0"),
        ({"rows_per_batch": 0}, ">= 1"),
    ],
)
def test_bad_requests_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        PlanRequest(**kwargs)  # type: ignore[arg-type]


def test_negative_costs_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="cost-gpu-slot"):
        Costs(gpu_slot=-1)
