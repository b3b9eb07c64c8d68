"""LRU for every capacity in one pass: stack distances (Mattson et al., 1970).

A request hits an LRU cache of ``C`` slots exactly when fewer than ``C`` distinct other keys
were requested since the same key's previous request (LRU's inclusion property), and an LRU
cache of ``C`` bytes exactly when those keys' bytes plus its own fit in ``C`` (the cache is
always the longest prefix of the recency stack that fits; see :func:`lru_needs`). So one pass
that measures each request's distance gives the hit rate of every capacity at once.

The distance of request ``i`` whose key was last requested at ``p`` is the number (and bytes) of
distinct keys requested in ``(p, i)``: Bennett and Kruskal's (1975) Fenwick tree over the
positions that are still their key's latest request counts it with one update and query per
request, compiled (``catalog.plan.compiled.stack_distance``): O(n log n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class StackDistances:
    """Per request: ``previous`` position of the same key (-1 for a first request), and the
    ``keys`` and ``bytes`` of the distinct other keys requested since then (0 when none)."""

    previous: IntArray
    keys: IntArray
    bytes: IntArray


def previous_and_next(ids: IntArray) -> tuple[IntArray, IntArray]:
    """For each position, the previous (-1 if none) and next (``len`` if none) position of the
    same id."""
    n = len(ids)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    same_as_before = np.empty(n, dtype=bool)
    if n:
        same_as_before[0] = False
        same_as_before[1:] = ordered[1:] == ordered[:-1]
    previous = np.full(n, -1, dtype=np.int64)
    following = np.full(n, n, dtype=np.int64)
    later = order[1:][same_as_before[1:]]
    earlier = order[:-1][same_as_before[1:]]
    previous[later] = earlier
    following[earlier] = later
    return previous, following


def stack_distances(ids: IntArray, sizes: IntArray) -> StackDistances:
    """Stack distances of a request sequence, in keys and in bytes.

    ``ids`` are integer key ids (one per request); ``sizes`` the size of each request's key.
    """
    # Imported here: numba loads on first use (see catalog.plan.compiled).
    from catalog.plan.compiled import distinct_since_previous

    ids = np.asarray(ids, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    previous, _ = previous_and_next(ids)
    keys, nbytes = distinct_since_previous(sizes, previous)
    return StackDistances(previous=previous, keys=keys, bytes=nbytes)


def lru_needs(distances: StackDistances, sizes: IntArray, *, unit: str) -> IntArray:
    """The smallest LRU capacity at which each request hits (``-1`` for a first request).

    ``unit="slots"``: distinct keys since the last request, plus one. ``unit="bytes"``: their
    bytes plus the key's own. A byte-bounded LRU that evicts from the cold end until the new item
    fits always holds the longest prefix of the recency stack that fits, because the bytes above
    an evicted key only grow until it is requested again.
    """
    if unit == "slots":
        need = distances.keys + 1
    else:
        need = distances.bytes + np.asarray(sizes, dtype=np.int64)
    return np.where(distances.previous >= 0, need, -1)


def lru_hits(needs: IntArray, sizes: IntArray, capacities: IntArray) -> tuple[IntArray, IntArray]:
    """Hits and hit bytes at each capacity, from :func:`lru_needs` (vectorised over both)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    repeat = needs >= 0
    order = np.argsort(needs[repeat], kind="stable")
    sorted_needs = needs[repeat][order]
    hit_bytes = np.zeros(len(sorted_needs) + 1, dtype=np.int64)
    np.cumsum(sizes[repeat][order], out=hit_bytes[1:])
    counts = np.searchsorted(sorted_needs, np.asarray(capacities, dtype=np.int64), "right")
    return counts.astype(np.int64), hit_bytes[counts]
