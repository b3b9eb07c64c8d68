"""Every eviction policy: the request protocol, byte accounting, pins, admission, scans."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.cache.policies import (
    DEFAULT_POLICY,
    LRU,
    POLICIES,
    S3FIFO,
    EvictionPolicy,
    SizeAwareLRFU,
    make_policy,
    resolve_policy_name,
)
from catalog.cache.replay import replay, replay_belady
from catalog.cache.traces import (
    Request,
    catalog_bytes,
    mixed_trace,
    scan_trace,
    shift_trace,
    synthetic_catalog,
    zipf_trace,
)
from catalog.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

ALL = sorted(POLICIES)


def request(policy: EvictionPolicy, key: str, size: int) -> list[str]:
    """One request the way a cache makes it; returns what was evicted."""
    if key in policy:
        policy.record_hit(key)
        return []
    if not policy.admit(key, size):
        return []
    evicted = policy.victims(size)
    policy.record_insert(key, size)
    return evicted


def check_invariants(policy: EvictionPolicy, resident: dict[str, int]) -> None:
    assert len(policy) == len(resident)
    assert policy.used_bytes == sum(resident.values())
    assert policy.used_bytes <= policy.capacity_bytes
    for key, size in resident.items():
        assert key in policy
        assert policy.size_of(key) == size


@pytest.mark.parametrize("name", ALL)
def test_capacity_is_respected_in_bytes(name: str, small_catalog: list[Request]) -> None:
    total = sum(size for _, size in small_catalog)
    policy = make_policy(name, total // 20)
    resident: dict[str, int] = {}
    for key, size in zipf_trace(small_catalog, 3000, s=0.9, seed=1):
        hit = key in policy
        for victim in request(policy, key, size):
            assert victim in resident, "a victim must have been resident"
            assert victim != key
            del resident[victim]
        if not hit and key in policy:
            resident[key] = size
        check_invariants(policy, resident)
    assert policy.used_bytes > policy.capacity_bytes // 2, "the cache should have filled"


@pytest.mark.parametrize("name", ALL)
def test_pinned_keys_are_never_victims(name: str, small_catalog: list[Request]) -> None:
    total = sum(size for _, size in small_catalog)
    policy = make_policy(name, total // 10)
    pinned = small_catalog[:3]
    for key, size in pinned:
        assert policy.admit(key, size)
        policy.victims(size)
        policy.record_insert(key, size)
        policy.pin(key)
    pinned_bytes = sum(size for _, size in pinned)
    assert policy.pinned_bytes == pinned_bytes
    for key, size in zipf_trace(small_catalog[3:], 4000, s=0.7, seed=2):
        for victim in request(policy, key, size):
            assert victim not in dict(pinned)
    for key, _ in pinned:
        assert key in policy and policy.is_pinned(key)
        policy.record_hit(key)  # hits on pinned keys are fine
    # Unpinned, they are ordinary residents again: making room for a full cache evicts them.
    for key, _ in pinned:
        policy.unpin(key)
    assert policy.pinned_bytes == 0
    evicted = policy.victims(policy.capacity_bytes)
    assert {key for key, _ in pinned} <= set(evicted)
    assert len(policy) == 0 and policy.used_bytes == 0


@pytest.mark.parametrize("name", ALL)
def test_pins_are_counted(name: str) -> None:
    policy = make_policy(name, 100)
    policy.admit("k", 60)
    policy.record_insert("k", 60)
    policy.pin("k")
    policy.pin("k")
    policy.unpin("k")
    assert policy.is_pinned("k")
    with pytest.raises(ResourceExhausted):
        policy.victims(50)  # only 40 unpinned bytes exist
    policy.unpin("k")
    assert not policy.is_pinned("k")
    assert policy.victims(50) == ["k"]
    assert len(policy) == 0 and policy.used_bytes == 0


@pytest.mark.parametrize("name", ALL)
def test_items_larger_than_capacity_are_refused(name: str) -> None:
    policy = make_policy(name, 1000)
    assert not policy.admit("huge", 1001)
    assert policy.admit("fits", 1000)
    policy.record_insert("fits", 1000)
    policy.pin("fits")
    # Beside pinned bytes, even a small item cannot fit.
    assert not policy.admit("small", 1)
    with pytest.raises(ResourceExhausted):
        policy.victims(1)


@pytest.mark.parametrize("name", ALL)
def test_protocol_errors_are_precise(name: str) -> None:
    policy = make_policy(name, 100)
    with pytest.raises(InvalidArgument):
        policy.admit("k", 0)
    with pytest.raises(InvalidArgument):
        policy.record_insert("k", -5)
    with pytest.raises(InvalidArgument):
        policy.victims(-1)
    with pytest.raises(NotFound):
        policy.record_hit("absent")
    with pytest.raises(NotFound):
        policy.remove("absent")
    with pytest.raises(NotFound):
        policy.pin("absent")
    with pytest.raises(FailedPrecondition):
        policy.unpin("absent")
    with pytest.raises(ResourceExhausted):
        policy.record_insert("too-big", 101)
    policy.record_insert("k", 40)
    with pytest.raises(AlreadyExists):
        policy.record_insert("k", 40)
    with pytest.raises(AlreadyExists):
        policy.admit("k", 40)
    with pytest.raises(ResourceExhausted):
        policy.record_insert("other", 61)  # victims() was not asked first
    policy.pin("k")
    with pytest.raises(FailedPrecondition):
        policy.remove("k")
    policy.unpin("k")
    policy.remove("k")
    assert "k" not in policy and policy.used_bytes == 0


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "10"])
@pytest.mark.parametrize("name", ALL)
def test_capacity_must_be_a_positive_integer(name: str, capacity: object) -> None:
    with pytest.raises(InvalidArgument):
        make_policy(name, capacity)  # type: ignore[arg-type]


def test_registry_resolves_default_and_refuses_unknown_names() -> None:
    assert DEFAULT_POLICY in POLICIES
    assert resolve_policy_name("default") == DEFAULT_POLICY
    assert make_policy("default", 10).name == DEFAULT_POLICY
    for name, factory in POLICIES.items():
        assert factory(10).name == name
    with pytest.raises(InvalidArgument, match="unknown eviction policy 'mru'"):
        make_policy("mru", 10)


def test_lru_evicts_least_recently_used_first() -> None:
    policy = LRU(30)
    for key in "abc":
        request(policy, key, 10)
    request(policy, "a", 10)  # a is now the most recent
    assert request(policy, "d", 10) == ["b"]
    assert request(policy, "e", 20) == ["c", "a"]
    assert sorted(["d", "e"]) == sorted(k for k in "abcde" if k in policy)


def test_s3fifo_sends_one_hit_wonders_through_the_small_queue_only() -> None:
    # small queue = 10% of 100 bytes; main = the rest.
    policy = S3FIFO(100, small_fraction=0.1)
    request(policy, "hot", 10)
    request(policy, "hot", 10)  # hit while in the small queue: promoted when it leaves it
    evicted: list[str] = []
    for i in range(30):
        evicted += request(policy, f"cold{i}", 10)
    assert "hot" in policy, "a key hit in the small queue moves to main"
    assert evicted[:3] == ["cold0", "cold1", "cold2"]
    assert "hot" not in evicted
    # A key evicted from the small queue leaves a ghost; its return goes straight to main.
    request(policy, "cold0", 10)
    for i in range(100, 103):
        request(policy, f"cold{i}", 10)
    assert "cold0" in policy


def test_default_policy_resists_a_scan(small_catalog: list[Request]) -> None:
    trace = scan_trace(small_catalog, 12_000, s=0.9, scan_share=0.5, seed=3)
    capacity = sum(size for _, size in small_catalog) // 10
    cold = {key for key, _ in small_catalog[200:]}  # swept once: 5x the cache's bytes
    lru = replay(trace, LRU(capacity))
    for name in (DEFAULT_POLICY, "s3fifo", "wtinylfu"):
        counters = replay(trace, make_policy(name, capacity))
        assert counters.hit_rate > lru.hit_rate + 0.05, name

    def warm_hit_rate_during_sweep(policy: EvictionPolicy) -> float:
        sweep = [position for position, (key, _) in enumerate(trace) if key in cold]
        hits = warm = 0
        for position, (key, size) in enumerate(trace):
            hit = key in policy
            request(policy, key, size)
            if sweep[0] <= position <= sweep[-1] and key not in cold:
                hits += hit
                warm += 1
        return hits / warm

    # While the sweep runs, LRU flushes its hot set; the default keeps serving it.
    default = warm_hit_rate_during_sweep(make_policy("default", capacity))
    assert default > 1.25 * warm_hit_rate_during_sweep(LRU(capacity))


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.10])
def test_default_policy_beats_lru_on_every_workload(fraction: float) -> None:
    """A small version of ``bench/bench_policies.py``: both rates at least LRU's, everywhere."""
    catalog = synthetic_catalog(1000, seed=3)
    capacity = int(catalog_bytes(catalog) * fraction)
    workloads = {
        "zipf": zipf_trace(catalog, 20_000, s=0.9, seed=1),
        "shift": shift_trace(catalog, 20_000, s=0.9, seed=2),
        "scan": scan_trace(catalog, 20_000, s=0.9, seed=3),
        "mix": mixed_trace(catalog, 20_000, seed=4),
    }
    for name, trace in workloads.items():
        default = replay(trace, make_policy("default", capacity))
        lru = replay(trace, LRU(capacity))
        assert default.hit_rate > lru.hit_rate, name
        assert default.byte_hit_rate > lru.byte_hit_rate, name
        assert default.hit_rate > 0.85 * replay_belady(trace, capacity).hit_rate, name


def test_lrfu_forgets_keys_not_requested_for_many_half_lives() -> None:
    policy = SizeAwareLRFU(20 * 10)  # 20 items of 10 bytes: half-life 640 to 8192 requests
    seen = 300_000
    for index in range(seen):  # every request a new key: a never-ending scan
        request(policy, f"scan{index}", 10)
        if index % 97 == 0:
            request(policy, "hot", 10)
    assert "hot" in policy
    assert 10 * 64 <= policy.half_life <= 128 * 64
    # Keys are pruned every 16 half-lives once unrequested for 16: at most the last 32 remain.
    assert policy.remembered_keys <= 32 * 128 * 64 < seen
    assert policy.used_bytes <= policy.capacity_bytes


operations = st.lists(
    st.tuples(
        st.sampled_from(["request", "request", "request", "pin", "unpin", "remove"]),
        st.integers(0, 24),
        st.integers(1, 40),
    ),
    max_size=300,
)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=60, deadline=None)
@given(ops=operations)
def test_random_operation_sequences_keep_every_invariant(
    name: str, ops: list[tuple[str, int, int]]
) -> None:
    policy = make_policy(name, 100)
    sizes: dict[str, int] = {}  # a key keeps the size of its first request
    resident: dict[str, int] = {}
    pins: dict[str, int] = {}
    for op, index, size in ops:
        key = f"k{index}"
        size = sizes.setdefault(key, size)
        if op == "request":
            was_resident = key in policy
            for victim in request(policy, key, size):
                assert pins.get(victim, 0) == 0, "a pinned key was evicted"
                del resident[victim]
            if not was_resident and key in policy:
                resident[key] = size
        elif op == "pin" and key in resident:
            policy.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif op == "unpin" and pins.get(key, 0) > 0:
            policy.unpin(key)
            pins[key] -= 1
        elif op == "remove" and key in resident and pins.get(key, 0) == 0:
            policy.remove(key)
            del resident[key]
        check_invariants(policy, resident)
        assert policy.pinned_bytes == sum(resident[k] for k, n in pins.items() if n > 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_a_million_keys(name: str) -> None:
    """10^6 resident keys, then a full turnover: every operation stays cheap enough to finish."""
    count = 1_000_000
    policy = make_policy(name, count * 10)
    rng = random.Random(5)
    for i in range(count):
        request(policy, f"k{i}", 10)
    assert len(policy) == count
    for _ in range(200_000):
        request(policy, f"k{rng.randrange(2 * count)}", 10)
    assert policy.used_bytes <= policy.capacity_bytes
