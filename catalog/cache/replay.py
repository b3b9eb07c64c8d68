"""Trace replay: hit rates of an eviction policy, of LRU and of Belady's offline reference.

``simulate`` is what ``loracat cache simulate`` prints. Belady here is the usual reference for
variable sizes: on a miss, evict the cached items whose next use is farthest in the future, and
do not cache the requested item at all when it would be used later than everything it displaces
(or never again). Exact offline optimum with variable sizes is NP-hard (it contains knapsack), so
this heuristic is not a strict upper bound: a size-aware online policy can beat its request hit
rate by preferring small items. With equal sizes it is Belady's MIN, which is optimal.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from catalog.cache.policies import LRU, EvictionPolicy, make_policy, resolve_policy_name
from catalog.cache.traces import Request, read_trace
from catalog.errors import InvalidArgument


@dataclass(slots=True)
class ReplayCounters:
    """What one replay counted. ``refused``: misses the policy chose not to cache."""

    requests: int = 0
    hits: int = 0
    bytes_requested: int = 0
    bytes_hit: int = 0
    evictions: int = 0
    refused: int = 0

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_rate(self) -> float:
        return self.bytes_hit / self.bytes_requested if self.bytes_requested else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "hit_rate": self.hit_rate,
            "byte_hit_rate": self.byte_hit_rate,
            "requests": self.requests,
            "hits": self.hits,
            "misses": self.misses,
            "bytes_requested": self.bytes_requested,
            "bytes_hit": self.bytes_hit,
            "evictions": self.evictions,
            "refused": self.refused,
        }


def replay(trace: Iterable[Request], policy: EvictionPolicy) -> ReplayCounters:
    """Run every request through ``policy`` the way a cache would (see ``policies``)."""
    counters = ReplayCounters()
    hits = requests = bytes_requested = bytes_hit = evictions = refused = 0
    for key, size in trace:
        requests += 1
        bytes_requested += size
        if key in policy:
            policy.record_hit(key)
            hits += 1
            bytes_hit += size
        elif policy.admit(key, size):
            evictions += len(policy.victims(size))
            policy.record_insert(key, size)
        else:
            refused += 1
    counters.requests, counters.hits, counters.evictions, counters.refused = (
        requests,
        hits,
        evictions,
        refused,
    )
    counters.bytes_requested, counters.bytes_hit = bytes_requested, bytes_hit
    return counters


def next_uses(keys: Sequence[str]) -> list[int]:
    """For each position, the position of the next request for the same key (``len`` if none)."""
    never = len(keys)
    result = [never] * never
    upcoming: dict[str, int] = {}
    for position in range(never - 1, -1, -1):
        key = keys[position]
        result[position] = upcoming.get(key, never)
        upcoming[key] = position
    return result


def replay_belady(trace: Sequence[Request], capacity_bytes: int) -> ReplayCounters:
    """Belady's farthest-next-use reference with bypass (see the module docstring).

    O(n log n): next uses are precomputed, the cache is a max-heap on next use with stale
    entries skipped lazily.

    Raises:
        InvalidArgument: ``capacity_bytes`` is not a positive integer.
    """
    if type(capacity_bytes) is not int or capacity_bytes <= 0:
        raise InvalidArgument(f"capacity must be a positive number of bytes: {capacity_bytes!r}")
    keys = [key for key, _ in trace]
    upcoming = next_uses(keys)
    never = len(keys)
    counters = ReplayCounters()
    cached: dict[str, int] = {}  # key -> position of its next use
    sizes: dict[str, int] = {}
    heap: list[tuple[int, str]] = []  # (-next use, key); stale when it disagrees with `cached`
    used = 0
    hits = bytes_hit = bytes_requested = evictions = refused = 0
    for position, (key, size) in enumerate(trace):
        bytes_requested += size
        following = upcoming[position]
        if key in cached:
            hits += 1
            bytes_hit += size
            cached[key] = following
            heapq.heappush(heap, (-following, key))
            continue
        if following == never or size > capacity_bytes:
            refused += 1
            continue
        if used + size > capacity_bytes:
            chosen: list[tuple[int, str]] = []
            freed = 0
            while used - freed + size > capacity_bytes:
                entry = heapq.heappop(heap)
                negated, victim = entry
                if cached.get(victim) != -negated:
                    continue  # stale
                if -negated < following:
                    heapq.heappush(heap, entry)
                    break
                chosen.append(entry)
                freed += sizes[victim]
            if used - freed + size > capacity_bytes:
                # Everything it would displace is needed sooner: do not cache it.
                for entry in chosen:
                    heapq.heappush(heap, entry)
                refused += 1
                continue
            for _, victim in chosen:
                del cached[victim]
                used -= sizes.pop(victim)
            evictions += len(chosen)
        cached[key] = following
        sizes[key] = size
        used += size
        heapq.heappush(heap, (-following, key))
    counters.requests, counters.hits, counters.bytes_hit = len(keys), hits, bytes_hit
    counters.bytes_requested, counters.evictions, counters.refused = (
        bytes_requested,
        evictions,
        refused,
    )
    return counters


def load_trace(trace: str | os.PathLike[str] | Iterable[Request]) -> list[Request]:
    """A trace as a list, read from a path or checked from an iterable of ``(key, size)``.

    Raises:
        InvalidArgument: an unreadable or malformed trace file, a malformed request, a key seen
            with two sizes, or an empty trace.
    """
    if isinstance(trace, str | os.PathLike):
        requests = read_trace(trace)
    else:
        requests = []
        sizes: dict[str, int] = {}
        for number, item in enumerate(trace, start=1):
            try:
                key, size = item
            except (TypeError, ValueError):
                raise InvalidArgument(f"request {number} is not a (key, size) pair") from None
            if not isinstance(key, str) or not key:
                raise InvalidArgument(f"request {number}: key {key!r} is not a non-empty string")
            if type(size) is not int or size <= 0:
                raise InvalidArgument(f"request {number}: size {size!r} is not a positive integer")
            known = sizes.setdefault(key, size)
            if known != size:
                raise InvalidArgument(
                    f"request {number}: {key} has size {size}, earlier {known}; "
                    "a key names one immutable pack"
                )
            requests.append((key, size))
    if not requests:
        raise InvalidArgument("the trace has no requests")
    return requests


def _rates(counters: ReplayCounters) -> dict[str, float]:
    return {"hit_rate": counters.hit_rate, "byte_hit_rate": counters.byte_hit_rate}


def simulate(
    trace: str | os.PathLike[str] | Iterable[Request], policy: str, capacity_bytes: int
) -> dict[str, Any]:
    """Replay ``trace`` through ``policy``, LRU and Belady at ``capacity_bytes``.

    Returns ``{"policy", "hit_rate", "byte_hit_rate", "lru": {...}, "belady": {...}, ...}`` with
    rates as fractions in [0, 1]; ``policy`` is the resolved registry name (``requested_policy``
    is what was asked for, e.g. ``"default"``). Also: ``capacity_bytes``, ``requests``,
    ``unique_keys``, ``catalog_bytes`` and the full counters under ``counters``.

    Raises:
        InvalidArgument: unknown policy, bad capacity, or a bad trace (see :func:`load_trace`).
    """
    name = resolve_policy_name(policy)
    evicting = make_policy(name, capacity_bytes)
    requests = load_trace(trace)
    measured = replay(requests, evicting)
    baseline = replay(requests, LRU(capacity_bytes))
    reference = replay_belady(requests, capacity_bytes)
    distinct = dict(requests)
    result: dict[str, Any] = {
        "policy": name,
        "requested_policy": policy,
        "hit_rate": measured.hit_rate,
        "byte_hit_rate": measured.byte_hit_rate,
        "lru": _rates(baseline),
        "belady": _rates(reference),
        "capacity_bytes": capacity_bytes,
        "requests": measured.requests,
        "unique_keys": len(distinct),
        "catalog_bytes": sum(distinct.values()),
        "evictions": measured.evictions,
        "counters": {
            name: measured.to_json(),
            "lru": baseline.to_json(),
            "belady": reference.to_json(),
        },
    }
    return result


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_simulation(result: dict[str, Any]) -> str:
    """The result of :func:`simulate` as a small table a person reads."""
    counters = result["counters"]
    name = result["policy"]
    rows = [(name, counters[name]), ("lru", counters["lru"]), ("belady", counters["belady"])]
    if name == "lru":
        rows.pop(1)
    shown = result["requested_policy"]
    heading = name if shown == name else f"{name} (as {shown})"
    lines = [
        f"policy {heading}, capacity {_human_bytes(result['capacity_bytes'])} "
        f"({result['capacity_bytes'] / max(1, result['catalog_bytes']):.1%} of "
        f"{_human_bytes(result['catalog_bytes'])} in {result['unique_keys']} keys), "
        f"{result['requests']} requests",
        f"{'policy':<12} {'hit rate':>9} {'byte hit':>9} {'hits':>10} {'evictions':>10}",
    ]
    for label, row in rows:
        lines.append(
            f"{label:<12} {row['hit_rate']:>9.2%} {row['byte_hit_rate']:>9.2%} "
            f"{row['hits']:>10} {row['evictions']:>10}"
        )
    belady = result["belady"]["hit_rate"]
    if belady > 0:
        lines.append(f"{name} reaches {result['hit_rate'] / belady:.1%} of Belady's hit rate")
    return "\n".join(lines)
