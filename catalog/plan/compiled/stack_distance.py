"""LRU stack distances compiled: Bennett and Kruskal's (1975) Fenwick tree over last-request
positions, one sequential update and query per request (``catalog.plan.stack`` documents what
the distances mean).

Position ``j`` is marked while it is the latest request of its key. The distance of request
``i`` whose key was last requested at ``p`` is then the marks in ``(p, i)``: the count and bytes
of the distinct other keys requested since. Two trees (marks and bytes) answer it in
O(log n); O(n log n) in all.
"""

from __future__ import annotations

import numpy as np

from catalog.plan.compiled._jit import jit
from catalog.plan.compiled.structures import IntArray


@jit
def _add(tree: IntArray, position: int, delta: int) -> None:
    index = position + 1
    while index < len(tree):
        tree[index] += delta
        index += index & -index


@jit
def _through(tree: IntArray, position: int) -> int:
    """The sum over positions ``0..position``."""
    total = 0
    index = position + 1
    while index > 0:
        total += tree[index]
        index -= index & -index
    return total


@jit
def distinct_since_previous(sizes: IntArray, previous: IntArray) -> tuple[IntArray, IntArray]:
    """Per request, the number and bytes of distinct other keys requested since ``previous``
    (the position of the same key's last request; 0 for a first request)."""
    n = len(sizes)
    marks = np.zeros(n + 1, dtype=np.int64)
    marked_bytes = np.zeros(n + 1, dtype=np.int64)
    keys = np.zeros(n, dtype=np.int64)
    nbytes = np.zeros(n, dtype=np.int64)
    total_marks = total_bytes = 0
    for position in range(n):
        earlier = previous[position]
        if earlier >= 0:
            keys[position] = total_marks - _through(marks, earlier)
            nbytes[position] = total_bytes - _through(marked_bytes, earlier)
            _add(marks, earlier, -1)
            _add(marked_bytes, earlier, -sizes[earlier])
            total_marks -= 1
            total_bytes -= sizes[earlier]
        _add(marks, position, 1)
        _add(marked_bytes, position, sizes[position])
        total_marks += 1
        total_bytes += sizes[position]
    return keys, nbytes
