"""LRU for every capacity in one pass: stack distances (Mattson et al., 1970).

A request hits an LRU cache of ``C`` slots exactly when fewer than ``C`` distinct other keys
were requested since the same key's previous request (LRU's inclusion property), and an LRU
cache of ``C`` bytes exactly when those keys' bytes plus its own fit in ``C`` (the cache is
always the longest prefix of the recency stack that fits; see :func:`lru_needs`). So one pass
that measures each request's distance gives the hit rate of every capacity at once.

The distance of request ``i`` whose key was last requested at ``p`` is the number (and bytes) of
positions ``j`` in ``(p, i)`` whose key is not requested again before ``i``, i.e. with
``next[j] > i``. Bennett and Kruskal (1975) count that with a Fenwick tree over last-access
positions, one sequential update and query per request; in Python that is ~10^7 interpreted
steps for 10^6 requests. Here the count is split into a part that is a plain sort
(``#{j < i: next[j] > i} = i - #{j: next[j] <= i}``) and a dominance count over a prefix,
``#{j <= p: next[j] > i}``, answered for all requests together with a merge-sort tree: at each
of the log2(n) levels the positions are sorted by ``next`` within blocks of 2^k, and every
query reads one block per set bit of its prefix length with ``numpy.searchsorted``. All of it is
vectorised numpy: O(n log^2 n) work, in C.
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


def _prefix_above(
    values: IntArray, weights: IntArray, prefix: IntArray, thresholds: IntArray
) -> tuple[IntArray, IntArray]:
    """For each query ``q``: how many ``j < prefix[q]`` have ``values[j] > thresholds[q]``, and
    the sum of their ``weights`` (a merge-sort tree; see the module docstring)."""
    n = len(values)
    levels = max(1, (n - 1).bit_length())
    width = 1 << levels
    shift = n + 2  # values are in [-1, n]; +1 makes them non-negative, < shift
    padded = np.full(width, -1, dtype=np.int64)
    padded[:n] = values
    padded += 1
    weight = np.zeros(width, dtype=np.int64)
    weight[:n] = weights
    counts = np.zeros(len(prefix), dtype=np.int64)
    sums = np.zeros(len(prefix), dtype=np.int64)
    order = np.arange(width, dtype=np.int64)
    slot = np.arange(width, dtype=np.int64)
    for level in range(levels + 1):
        block_size = 1 << level
        if level:
            # Two sorted runs per block: the stable sort (timsort) merges them in O(width).
            key = (slot >> level) * shift + padded[order]
            order = order[np.argsort(key, kind="stable")]
        asked = np.nonzero(prefix & block_size)[0]
        if not len(asked):
            continue
        block = (prefix[asked] >> level) - 1
        sorted_key = (slot >> level) * shift + padded[order]
        cumulative = np.zeros(width + 1, dtype=np.int64)
        np.cumsum(weight[order], out=cumulative[1:])
        first_above = np.searchsorted(sorted_key, block * shift + thresholds[asked] + 1, "right")
        block_end = (block + 1) * block_size
        counts[asked] += block_end - first_above
        sums[asked] += cumulative[block_end] - cumulative[first_above]
    return counts, sums


def stack_distances(ids: IntArray, sizes: IntArray) -> StackDistances:
    """Stack distances of a request sequence, in keys and in bytes.

    ``ids`` are integer key ids (one per request); ``sizes`` the size of each request's key.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(ids)
    previous, following = previous_and_next(ids)
    positions = np.arange(n, dtype=np.int64)
    # Part 1: #{j < i: next[j] > i} = i - #{j: next[j] <= i}, and the same in bytes.
    by_next = np.argsort(following, kind="stable")
    next_sorted = following[by_next]
    bytes_by_next = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes[by_next], out=bytes_by_next[1:])
    done = np.searchsorted(next_sorted, positions, "right")
    bytes_before = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=bytes_before[1:])
    live_keys = positions - done
    live_bytes = bytes_before[:n] - bytes_by_next[done]
    # Part 2: subtract those requested at or before p: #{j <= p: next[j] > i}.
    repeat = np.nonzero(previous >= 0)[0]
    keys = np.zeros(n, dtype=np.int64)
    nbytes = np.zeros(n, dtype=np.int64)
    if len(repeat):
        older_keys, older_bytes = _prefix_above(
            following, sizes, previous[repeat] + 1, repeat.astype(np.int64)
        )
        keys[repeat] = live_keys[repeat] - older_keys
        nbytes[repeat] = live_bytes[repeat] - older_bytes
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
