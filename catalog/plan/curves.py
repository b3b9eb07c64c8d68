"""Hit-rate curves of one tier: every policy and Belady's reference, at every capacity.

LRU comes from stack distances (one pass for all capacities, ``catalog.plan.stack``); the other
policies are replayed once per capacity point (they lack LRU's inclusion property, so no
one-pass shortcut exists for them), and so is Belady's reference (the farthest-next-use rule
with bypass of ``catalog.cache.replay.replay_belady``). Those replays are the compiled ones of
``catalog.plan.compiled``, tested to decide exactly as the ``catalog.cache.policies`` classes and
the Python references below (:func:`replay_policy`, :func:`replay_belady_ids`) do. They are
independent and release the GIL, so they run side by side in a pool of threads.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from catalog.cache.policies import EvictionPolicy
from catalog.plan.compiled import BELADY, compile_kernels, replay_ids
from catalog.plan.stack import lru_hits, previous_and_next

IntArray = npt.NDArray[np.int64]

__all__ = ["BELADY", "TierStream", "replay_belady_ids", "replay_policy", "tier_curves"]


@dataclass(frozen=True)
class TierStream:
    """The requests reaching one tier: per group (one per engine, or one for a shared tier),
    key ids, the sizes the policy charges (1 per slot, or bytes) and the bytes they carry."""

    unit: str  # "slots" or "bytes"
    keys: list[str]
    groups: list[IntArray]  # per group: key ids in request order
    group_starts: list[int]  # per group: how many of its first requests are warm-up
    key_sizes: IntArray
    needs: IntArray  # LRU needs per measured request (see stack.lru_needs)
    sizes: IntArray  # bytes per measured request

    @property
    def requests(self) -> int:
        return len(self.sizes)

    @property
    def bytes_requested(self) -> int:
        return int(self.sizes.sum())


def replay_policy(
    keys: Sequence[str],
    charged: Sequence[int],
    carried: Sequence[int],
    policy: EvictionPolicy,
    *,
    start: int = 0,
) -> tuple[int, int]:
    """Hits and hit bytes of ``policy`` over requests for ``keys``, each charging ``charged``
    against the capacity and carrying ``carried`` bytes (the ``catalog.cache.replay`` protocol);
    the first ``start`` requests are replayed but not counted (warm-up).
    """
    contains, record_hit = policy.__contains__, policy.record_hit
    admit, victims, insert = policy.admit, policy.victims, policy.record_insert
    for key, charge in zip(keys[:start], charged[:start], strict=True):
        if contains(key):
            record_hit(key)
        elif admit(key, charge):
            victims(charge)
            insert(key, charge)
    hits = hit_bytes = 0
    for key, charge, nbytes in zip(keys[start:], charged[start:], carried[start:], strict=True):
        if contains(key):
            record_hit(key)
            hits += 1
            hit_bytes += nbytes
        elif admit(key, charge):
            victims(charge)
            insert(key, charge)
    return hits, hit_bytes


def replay_belady_ids(
    ids: IntArray,
    charged: IntArray,
    carried: IntArray,
    capacity: int,
    *,
    start: int = 0,
    evicted: list[int] | None = None,
) -> tuple[int, int]:
    """Belady's farthest-next-use reference with bypass, as ``replay_belady``, over ids; the
    first ``start`` requests are not counted. Victims are appended to ``evicted`` (if given)
    in eviction order."""
    _, upcoming_array = previous_and_next(ids)
    upcoming = upcoming_array.tolist()
    never = len(ids)
    cached: dict[int, int] = {}  # id -> position of its next use
    charge_of: dict[int, int] = {}
    heap: list[tuple[int, int]] = []
    used = hits = hit_bytes = 0
    push, pop = heapq.heappush, heapq.heappop
    for position, (key, charge, nbytes) in enumerate(
        zip(ids.tolist(), charged.tolist(), carried.tolist(), strict=True)
    ):
        following = upcoming[position]
        if key in cached:
            if position >= start:
                hits += 1
                hit_bytes += nbytes
            cached[key] = following
            push(heap, (-following, key))
            continue
        if following == never or charge > capacity:
            continue
        if used + charge > capacity:
            chosen: list[tuple[int, int]] = []
            freed = 0
            while used - freed + charge > capacity:
                entry = pop(heap)
                negated, victim = entry
                if cached.get(victim) != -negated:
                    continue  # stale
                if -negated < following:
                    push(heap, entry)
                    break
                chosen.append(entry)
                freed += charge_of[victim]
            if used - freed + charge > capacity:
                for entry in chosen:
                    push(heap, entry)
                continue
            for _, victim in chosen:
                del cached[victim]
                used -= charge_of.pop(victim)
            if evicted is not None:
                evicted.extend(victim for _, victim in chosen)
        cached[key] = following
        charge_of[key] = charge
        used += charge
        push(heap, (-following, key))
    return hits, hit_bytes


def _run(stream: TierStream, policy: str, capacity: int) -> tuple[int, int]:
    """Hits and hit bytes of ``policy`` (or Belady) at ``capacity`` over every group."""
    hits = hit_bytes = 0
    for ids, start in zip(stream.groups, stream.group_starts, strict=True):
        carried = stream.key_sizes[ids]
        charged = np.ones_like(carried) if stream.unit == "slots" else carried
        h, b, _ = replay_ids(policy, ids, charged, carried, capacity, start=start)
        hits += h
        hit_bytes += b
    return hits, hit_bytes


def _point(
    policy: str, capacity: int, hits: int, hit_bytes: int, stream: TierStream
) -> dict[str, Any]:
    return {
        "policy": policy,
        "capacity": int(capacity),
        "hit_rate": hits / stream.requests if stream.requests else 0.0,
        "byte_hit_rate": hit_bytes / stream.bytes_requested if stream.requests else 0.0,
    }


def tier_curves(
    stream: TierStream, policies: Sequence[str], capacities: Sequence[int], *, workers: int = 0
) -> list[dict[str, Any]]:
    """``{"policy", "capacity", "hit_rate", "byte_hit_rate"}`` for every policy (and
    ``belady``) at every capacity. ``workers``: threads (0: one per CPU; 1: none).

    LRU at a byte capacity below the largest pack is replayed instead of read from the stack
    distances: the real LRU refuses a pack larger than the cache, which the stack would count
    as flushing it.
    """
    points: dict[tuple[str, int], tuple[int, int]] = {}
    jobs: list[tuple[str, int]] = []
    largest = int(max((int(stream.key_sizes[g].max()) for g in stream.groups), default=0))
    for policy in [*policies, BELADY]:
        for capacity in capacities:
            if policy == "lru" and (stream.unit == "slots" or capacity >= largest):
                continue
            jobs.append((policy, int(capacity)))
    if "lru" in policies and stream.requests:
        exact = [c for c in capacities if stream.unit == "slots" or c >= largest]
        if exact:
            counts, nbytes = lru_hits(stream.needs, stream.sizes, np.asarray(exact))
            for capacity, h, b in zip(exact, counts.tolist(), nbytes.tolist(), strict=True):
                points[("lru", int(capacity))] = (h, b)
    if stream.requests and jobs:
        compile_kernels()  # once, here, rather than in every worker at once
        count = min(workers or os.cpu_count() or 1, len(jobs))
        if count > 1:
            # Longest first, so that no slow replay starts last.
            ordered = sorted(jobs, key=lambda job: -job[1])
            with ThreadPoolExecutor(count) as pool:
                results = pool.map(lambda job: _run(stream, *job), ordered)
                for job, result in zip(ordered, results, strict=True):
                    points[job] = result
        else:
            for job in jobs:
                points[job] = _run(stream, *job)
    return [
        _point(policy, capacity, *points.get((policy, int(capacity)), (0, 0)), stream)
        for policy in [*policies, BELADY]
        for capacity in capacities
    ]
