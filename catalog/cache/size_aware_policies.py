"""The size-aware policies: ``gdsf`` and ``lrfu-size``, which rank items by value per byte.

* ``gdsf`` - Greedy-Dual-Size-Frequency (Cherkasova '98): evicts the lowest
  ``clock + hits / size``; hits count only while resident.
* ``lrfu-size`` - size-aware LRFU (Lee et al., '01) with TinyLFU-style admission: every request
  adds a weight that doubles every half-life, so a key's value is its exponentially decayed
  request count (recency and frequency in one number, kept for recently evicted keys too). Items
  rank by ``value / size ** size_exponent``; the lowest-ranked go first, and a missed item is
  cached only if everything it would displace ranks below it, which also makes it scan
  resistant. Ranking by value per byte is the greedy answer to the knapsack that caching
  variable sizes is; the default exponent (0.6) keeps most of that gain in request hit rate
  while giving up less byte hit rate than 1.0 would. The half-life is about twice the number of
  keys the workload touches, in requests.

Both keep their unpinned resident keys in a heap with lazy deletion
(:mod:`catalog.cache.lazy_heap`): O(log n) per operation. The compiled replays
(:mod:`catalog.plan.compiled.greedy_dual`) make the same decisions, down to the order of heap
pushes that breaks ties; a change here must be made there too.
"""

from __future__ import annotations

import math
from abc import abstractmethod

from catalog.cache.eviction_policy import EvictionPolicy
from catalog.cache.lazy_heap import Entry, LazyMinHeap
from catalog.errors import InvalidArgument

__all__ = ["GDSF", "HeapRankedPolicy", "SizeAwareLRFU"]


class HeapRankedPolicy(EvictionPolicy):
    """A policy that ranks its unpinned resident keys by a priority and evicts the lowest.

    Subclasses rank a key with ``_push`` (at the priority they compute there, inline: it runs
    on every hit and insert) and call it or ``_rerank`` whenever the priority changes; pinning
    takes a key out of the ranking and unpinning ranks it again.
    """

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._ranking = LazyMinHeap()  # unpinned resident keys only

    @abstractmethod
    def _push(self, key: str) -> None:
        """Rank ``key`` at its current priority (first time, or again after a change); the
        lowest is evicted first."""

    def _rerank(self, key: str) -> None:
        """Rank ``key`` again after its priority changed, unless it is pinned (and so out of
        the ranking until ``_relink``)."""
        if key in self._ranking.priorities:
            self._push(key)

    def _pop_lowest(self) -> tuple[float, str]:
        """Take the lowest-ranked key out of the ranking: ``(priority, key)``."""
        lowest = self._ranking.pop_lowest()
        if lowest is None:
            raise self._nothing_to_evict()
        return lowest

    def _unlink(self, key: str) -> None:
        self._ranking.remove(key)

    def _relink(self, key: str) -> None:
        self._push(key)


class GDSF(HeapRankedPolicy):
    """Greedy-Dual-Size-Frequency: evict the lowest ``clock + hits / size`` (O(log n))."""

    name = "gdsf"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._clock = 0.0
        self._hits: dict[str, int] = {}

    def _push(self, key: str) -> None:
        # Sizes in MiB keep priorities readable; the ratio is all that matters.
        self._ranking.push(key, self._clock + self._hits[key] * 1_048_576 / self._sizes[key])

    def _on_insert(self, key: str, size: int) -> None:
        self._hits[key] = 1
        self._push(key)

    def _on_hit(self, key: str) -> None:
        self._hits[key] += 1
        self._rerank(key)

    def _choose_victims(self, bytes_needed: int) -> list[str]:
        self._clock, key = self._pop_lowest()
        del self._hits[key]
        return [key]

    def _forget(self, key: str) -> None:
        del self._hits[key]


class SizeAwareLRFU(HeapRankedPolicy):
    """Size-aware LRFU with admission by rank (see the module docstring)."""

    name = "lrfu-size"

    _RESCALE_AT = 2.0**16  # every 16 half-lives, which also prunes forgotten keys
    _FORGET_BELOW = 2.0**-16
    _RETUNE_EVERY = 1024
    _MIN_ITEMS = 64

    def __init__(
        self,
        capacity_bytes: int,
        *,
        size_exponent: float = 0.6,
        half_life_per_key: float = 2.0,
        half_life_bounds: tuple[float, float] = (10.0, 128.0),
    ) -> None:
        """``size_exponent``: 0 ranks by value alone (byte hits), 1 by value per byte (request
        hits). A request's weight halves every ``half_life_per_key x (keys remembered)``
        requests, clamped to ``half_life_bounds x (resident items, at least 64)``.

        The half-life follows the number of keys the workload touches, so that the catalog is
        requested about twice over in one: long enough to tell a key requested every ~N
        requests from one requested every ~10N (Zipf), short enough to follow a hot set that
        moves. The upper bound stops a stream of new keys from stretching it without end.

        Raises:
            InvalidArgument: a parameter out of range.
        """
        super().__init__(capacity_bytes)
        low, high = half_life_bounds
        if not 0 <= size_exponent <= 1 or half_life_per_key <= 0 or not 0 < low <= high:
            raise InvalidArgument(
                "size_exponent must be in [0, 1], half_life_per_key positive, "
                "half_life_bounds (low, high) with 0 < low <= high"
            )
        self._exponent = size_exponent
        self._half_life_per_key = half_life_per_key
        self._half_life_bounds = (low, high)
        self._weight = 1.0  # what a request made now adds; doubles every half-life
        self._growth = 1.0
        self._until_retune = 0
        self._value: dict[str, float] = {}  # decayed request count, resident or recently seen

    @property
    def remembered_keys(self) -> int:
        """Keys with a value: the resident ones, and those requested in the last 16 to 32
        half-lives (forgotten keys are pruned every 16)."""
        return len(self._value)

    @property
    def half_life(self) -> float:
        """The current half-life of a request's weight, in requests."""
        items = max(self._MIN_ITEMS, len(self._sizes))
        low, high = self._half_life_bounds
        per_key = self._half_life_per_key * len(self._value)
        return min(max(low * items, per_key), high * items)

    def _count(self, key: str) -> None:
        if self._until_retune <= 0:
            self._growth = 2.0 ** (1.0 / self.half_life)
            self._until_retune = self._RETUNE_EVERY
        self._until_retune -= 1
        self._weight *= self._growth
        if self._weight >= self._RESCALE_AT:
            self._rescale()
        self._value[key] = self._value.get(key, 0.0) + self._weight

    def _rescale(self) -> None:
        """Divide every value by the current weight, forgetting long-unrequested keys."""
        factor = 1.0 / self._weight
        floor = self._FORGET_BELOW
        sizes = self._sizes
        self._value = {
            key: value * factor
            for key, value in self._value.items()
            if value * factor >= floor or key in sizes
        }
        self._weight = 1.0
        ranked = self._ranking.keys()
        self._ranking.clear()
        for key in ranked:
            self._push(key)

    def _score(self, key: str, size: int) -> float:
        return self._value[key] / math.pow(size, self._exponent)

    def _push(self, key: str) -> None:
        self._ranking.push(key, self._score(key, self._sizes[key]))

    def _should_admit(self, key: str, size: int) -> bool:
        self._count(key)
        shortfall = self._used + size - self._capacity
        if shortfall <= 0:
            return True
        # Admit only if every item it would displace ranks below the candidate. Take them to
        # look, then put them back: victims() takes them out. ``admit`` checked that the
        # unpinned bytes cover the shortfall, so the heap does not run dry first.
        score = self._score(key, size)
        ranking, sizes = self._ranking, self._sizes
        looked: list[Entry] = []
        freed = 0
        while freed < shortfall:
            entry = ranking.take_lowest()
            looked.append(entry)
            if entry[0] >= score:
                break
            freed += sizes[entry[2]]
        ranking.put_back(looked)
        return freed >= shortfall

    def _on_insert(self, key: str, size: int) -> None:
        if key not in self._value:  # inserted without a counted request (a cache reopening)
            self._count(key)
        self._push(key)

    def _on_hit(self, key: str) -> None:
        self._count(key)
        self._rerank(key)

    def _choose_victims(self, bytes_needed: int) -> list[str]:
        return [self._pop_lowest()[1]]
