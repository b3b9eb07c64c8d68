"""A min-heap of keys whose priorities change: the ranking of the heap-based eviction policies.

GDSF and size-aware LRFU (:mod:`catalog.cache.size_aware_policies`) rank the resident, unpinned
keys by a priority that changes on every hit, and evict the lowest. Re-sorting on every change
would cost O(n); instead a change pushes a new entry and leaves the old one in the heap. An entry
is live while its priority is its key's current one; stale entries are skipped when they reach
the top (lazy deletion), and a push sweeps them out when they outnumber the live keys (plus
1024), so after a push the heap holds at most twice the live keys plus 1024 entries. Equal
priorities pop in the order pushed.

The compiled replays (:mod:`catalog.plan.compiled.greedy_dual`) mirror this exactly, down to
the push sequence that breaks ties; a change here must be made there too.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable

__all__ = ["Entry", "LazyMinHeap"]

#: One heap entry: (priority, push sequence, key).
Entry = tuple[float, int, str]


class LazyMinHeap:
    """Keys with priorities; O(log n) to set a priority or pop the lowest, O(1) to remove."""

    __slots__ = ("_heap", "_sequence", "priorities")

    def __init__(self) -> None:
        #: The live keys and their current priorities: to read (a plain dict, for speed on
        #: the policies' hot path); change them through the methods only.
        self.priorities: dict[str, float] = {}
        self._heap: list[Entry] = []
        self._sequence = itertools.count()

    def keys(self) -> list[str]:
        """The live keys, in the order they were added."""
        return list(self.priorities)

    def push(self, key: str, priority: float) -> None:
        """Add ``key`` with ``priority``, or move it there if it is in the heap."""
        self.priorities[key] = priority
        heapq.heappush(self._heap, (priority, next(self._sequence), key))
        if len(self._heap) > 2 * len(self.priorities) + 1024:
            current = self.priorities
            self._heap = [entry for entry in self._heap if current.get(entry[2]) == entry[0]]
            heapq.heapify(self._heap)

    def remove(self, key: str) -> None:
        """Take ``key`` out (its entries go stale). Raises ``KeyError`` when it is not in."""
        del self.priorities[key]

    def clear(self) -> None:
        """Take every key out. The push sequence goes on, so ties still pop in push order."""
        self.priorities = {}
        self._heap = []

    def pop_lowest(self) -> tuple[float, str] | None:
        """Take out the key of lowest priority; ``(priority, key)``, or ``None`` when empty."""
        heap, current = self._heap, self.priorities
        while heap:
            priority, _, key = heapq.heappop(heap)
            if current.get(key) == priority:
                del current[key]
                return priority, key
        return None

    def take_lowest(self) -> Entry:
        """The lowest live entry, popped from the heap but with its key still in: to look at
        the lowest few without evicting them, then :meth:`put_back` every entry taken (stale
        entries met on the way are dropped for good).

        Raises:
            IndexError: no live entry is left.
        """
        heap, current = self._heap, self.priorities
        while True:
            entry = heapq.heappop(heap)
            if current.get(entry[2]) == entry[0]:
                return entry

    def put_back(self, entries: Iterable[Entry]) -> None:
        """Return entries that :meth:`take_lowest` gave."""
        for entry in entries:
            heapq.heappush(self._heap, entry)
