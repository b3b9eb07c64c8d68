"""The compiled replays (``catalog.plan.compiled``) make exactly the decisions of the Python
policies in ``catalog.cache.policies`` and of Belady's Python reference: the same hits, hit
bytes and victims, in the same order, on random traces (unit and byte charges, tiny and medium
capacities, ties, a key larger than the capacity, warm-up) and on Zipf traces long enough to
reach every policy's slow paths (LRFU's rescale, W-TinyLFU's aging, the heaps' compaction)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import catalog.plan.curves
from catalog.cache.policies import POLICIES, make_policy
from catalog.cache.replay import replay_belady
from catalog.errors import InvalidArgument
from catalog.plan.compiled import BELADY, COMPILED, replay_ids
from catalog.plan.curves import replay_belady_ids, replay_policy
from catalog.plan.planner import PlanRequest, build_plan
from catalog.plan.profile import DEFAULT_PROFILE
from catalog.plan.workload import synthetic_workload

EVERY = [*POLICIES, BELADY]


def _key(key_id: int) -> str:
    # Zero-padded, so that string order is id order (Belady breaks ties by key).
    return f"k{key_id:07d}"


def python_replay(
    policy: str,
    ids: np.ndarray,
    charged: np.ndarray,
    carried: np.ndarray,
    capacity: int,
    start: int,
) -> tuple[int, int, list[int]]:
    """Hits, hit bytes and the victims, in eviction order, of the Python code."""
    if policy == BELADY:
        evicted: list[int] = []
        hits, hit_bytes = replay_belady_ids(
            ids, charged, carried, capacity, start=start, evicted=evicted
        )
        return hits, hit_bytes, evicted
    cache = make_policy(policy, capacity)
    hits = hit_bytes = 0
    victims: list[str] = []
    for position, (key_id, charge, nbytes) in enumerate(
        zip(ids.tolist(), charged.tolist(), carried.tolist(), strict=True)
    ):
        key = _key(key_id)
        if key in cache:
            cache.record_hit(key)
            if position >= start:
                hits += 1
                hit_bytes += nbytes
        elif cache.admit(key, charge):
            victims.extend(cache.victims(charge))
            cache.record_insert(key, charge)
    return hits, hit_bytes, [int(key[1:]) for key in victims]


def assert_same(
    policy: str,
    ids: np.ndarray,
    charged: np.ndarray,
    carried: np.ndarray,
    capacity: int,
    start: int = 0,
) -> None:
    hits, hit_bytes, victims = replay_ids(
        policy, ids, charged, carried, capacity, start=start, log=True
    )
    expected_hits, expected_bytes, expected_victims = python_replay(
        policy, ids, charged, carried, capacity, start
    )
    assert (hits, hit_bytes) == (expected_hits, expected_bytes), (policy, capacity, start)
    assert victims == expected_victims, (policy, capacity, start)
    if policy == BELADY and np.array_equal(charged, carried):
        # And the string-keyed reference in catalog.cache.replay, which counts its evictions.
        trace = [(_key(k), int(c)) for k, c in zip(ids.tolist(), charged.tolist(), strict=True)]
        reference = replay_belady(trace, capacity)
        assert start or (reference.hits, reference.bytes_hit) == (hits, hit_bytes)
        assert reference.evictions == len(victims), (policy, capacity)


@st.composite
def small_traces(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """A trace over at most 12 keys (sizes from a few values, so ties are common), charged per
    slot or per byte, a capacity from 1 to past the catalog, and a warm-up prefix."""
    keys = draw(st.integers(1, 12))
    key_sizes = draw(st.lists(st.sampled_from([1, 2, 3, 5, 8, 40]), min_size=keys, max_size=keys))
    ids = np.array(draw(st.lists(st.integers(0, keys - 1), min_size=1, max_size=150)))
    carried = np.array(key_sizes, dtype=np.int64)[ids]
    charged = np.ones_like(carried) if draw(st.booleans()) else carried
    capacity = draw(st.integers(1, int(np.array(key_sizes).sum()) + 3))
    start = draw(st.integers(0, len(ids)))
    return ids.astype(np.int64), charged, carried, capacity, start


@pytest.mark.parametrize("policy", EVERY)
@settings(max_examples=200, deadline=None)
@given(trace=small_traces())
def test_random_small_traces(
    policy: str, trace: tuple[np.ndarray, np.ndarray, np.ndarray, int, int]
) -> None:
    ids, charged, carried, capacity, start = trace
    assert_same(policy, ids, charged, carried, capacity, start)


def zipf_trace(seed: int, requests: int, keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Zipf(0.9) requests whose hot set moves every quarter, sizes 1 KiB to 1 MiB."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1) ** 0.9
    weights /= weights.sum()
    parts = []
    for _ in range(4):
        ranks = rng.choice(keys, size=requests // 4, p=weights)
        parts.append(rng.permutation(keys)[ranks])
    ids = np.concatenate(parts).astype(np.int64)
    key_sizes = rng.integers(1 << 10, 1 << 20, size=keys).astype(np.int64)
    # A few equal sizes, for ties in the size-aware rankings.
    key_sizes[rng.choice(keys, size=keys // 10, replace=False)] = 1 << 19
    return ids, key_sizes


@pytest.mark.parametrize("policy", EVERY)
@pytest.mark.parametrize(("seed", "keys"), [(0, 1_500), (1, 1_500), (3, 200)])
def test_zipf_traces_in_bytes(policy: str, seed: int, keys: int) -> None:
    ids, key_sizes = zipf_trace(seed, 24_000, keys)
    carried = key_sizes[ids]
    catalog = int(key_sizes.sum())
    # Tiny (below the largest key: some keys never fit) to most of the catalog.
    for capacity in (1 << 19, 3 << 20, catalog // 20, catalog // 3):
        assert_same(policy, ids, carried, carried, capacity, start=2_000)


@pytest.mark.parametrize("policy", EVERY)
def test_zipf_trace_in_slots(policy: str) -> None:
    ids, key_sizes = zipf_trace(2, 24_000, 1_500)
    carried = key_sizes[ids]
    for slots in (1, 7, 150, 900):
        assert_same(policy, ids, np.ones_like(carried), carried, slots, start=1_000)


def test_the_slow_paths_are_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """The byte-sized Zipf traces above reach LRFU's rescale (its weight falls back to 1),
    W-TinyLFU's aging (its count of additions halves) and the heaps' compaction (``heapify``)."""
    import heapq

    from catalog.cache.policies import GDSF, SizeAwareLRFU, WTinyLFU

    compactions = 0
    real_heapify = heapq.heapify

    def counting_heapify(heap: list[object]) -> None:
        nonlocal compactions
        compactions += 1
        real_heapify(heap)

    monkeypatch.setattr(heapq, "heapify", counting_heapify)
    # 200 keys: LRFU's half-life is its floor, 640 requests, so it rescales every 10,240.
    ids, key_sizes = zipf_trace(3, 24_000, 200)
    capacity = int(key_sizes.sum()) // 3
    lrfu, tinylfu, gdsf = SizeAwareLRFU(capacity), WTinyLFU(capacity), GDSF(capacity)
    rescales = agings = 0
    for key_id in ids.tolist():
        key, size = _key(key_id), int(key_sizes[key_id])
        weight, additions = lrfu._weight, tinylfu._counter._additions
        for cache in (lrfu, tinylfu, gdsf):
            if key in cache:
                cache.record_hit(key)
            elif cache.admit(key, size):
                cache.victims(size)
                cache.record_insert(key, size)
        rescales += lrfu._weight < weight
        agings += tinylfu._counter._additions < additions
    assert rescales > 0 and agings > 0 and compactions > 0, (rescales, agings, compactions)


def test_bad_arguments_are_refused() -> None:
    ids = np.array([0, 1], dtype=np.int64)
    ones = np.ones(2, dtype=np.int64)
    with pytest.raises(InvalidArgument, match="no compiled replay"):
        replay_ids("fifo", ids, ones, ones, 1)
    with pytest.raises(InvalidArgument, match="capacity"):
        replay_ids("lru", ids, ones, ones, 0)
    with pytest.raises(InvalidArgument, match="one entry per request"):
        replay_ids("lru", ids, ones[:1], ones, 1)
    with pytest.raises(InvalidArgument, match="charges positive"):
        replay_ids("lru", ids, ones * 0, ones, 1)


def test_every_policy_has_a_compiled_replay() -> None:
    assert set(COMPILED) == {*POLICIES, BELADY}


def test_the_plan_is_the_one_the_python_policies_give(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole plan (two engines, so per-engine groups; 2 threads) with the compiled replays,
    then with the Python policy objects and Belady's Python reference in their place."""
    workload = synthetic_workload(
        adapters=300, zipf=1.0, rate=50, duration_s=100, shift_every_s=40, seed=5
    )
    request = PlanRequest(slo_p99_ms=60, points=5, engines=2, workers=2)
    compiled = build_plan(workload, request, DEFAULT_PROFILE)

    def python_replay_ids(
        policy: str,
        ids: np.ndarray,
        charged: np.ndarray,
        carried: np.ndarray,
        capacity: int,
        *,
        start: int = 0,
    ) -> tuple[int, int, list[int]]:
        if policy == BELADY:
            return (*replay_belady_ids(ids, charged, carried, capacity, start=start), [])
        cache = make_policy(policy, capacity)
        keys = [_key(k) for k in ids.tolist()]
        hits = replay_policy(keys, charged.tolist(), carried.tolist(), cache, start=start)
        return (*hits, [])

    monkeypatch.setattr(catalog.plan.curves, "replay_ids", python_replay_ids)
    python = build_plan(workload, request, DEFAULT_PROFILE)
    assert compiled == python
    assert len(compiled["tiers"]["host"]["curves"]) == 6 * len(
        compiled["tiers"]["host"]["capacities"]
    )
