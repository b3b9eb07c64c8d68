"""The frequency policy: ``wtinylfu``, with the request counts it admits by.

``wtinylfu`` is W-TinyLFU (Einziger et al., ToS'17; Caffeine): a small LRU window, then an
admission duel into a segmented LRU main decided by request frequency, sized by bytes: the
candidate enters main only if it was requested more often than all the main items it would
displace together. Frequencies are exact counts (``FrequencyCounter``), halved every ``10 x``
resident-item count requests (the aging of the count-min sketch, without its hash collisions; at
10^6 keys the exact table is affordable, and deterministic across runs). O(1) amortised.

The compiled replay (:mod:`catalog.plan.compiled.tinylfu`) makes the same decisions; a change
here must be made there too.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from catalog.cache.eviction_policy import EvictionPolicy
from catalog.errors import InvalidArgument

__all__ = ["FrequencyCounter", "WTinyLFU"]


class FrequencyCounter:
    """Request counts per key, capped at 15 and halved every ``sample_size`` increments.

    It plays the role of TinyLFU's count-min sketch with the same aging ("reset"), but exact:
    memory is bounded by the keys seen in the last two sample periods.
    """

    def __init__(self, sample_size: int, *, cap: int = 15) -> None:
        self.sample_size = sample_size
        self._cap = cap
        self._counts: dict[str, int] = {}
        self._additions = 0

    def __len__(self) -> int:
        return len(self._counts)

    def frequency(self, key: str) -> int:
        return self._counts.get(key, 0)

    def increment(self, key: str) -> None:
        count = self._counts.get(key, 0)
        if count < self._cap:
            self._counts[key] = count + 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self._age()

    def _age(self) -> None:
        self._counts = {key: count >> 1 for key, count in self._counts.items() if count > 1}
        self._additions //= 2


class WTinyLFU(EvictionPolicy):
    """W-TinyLFU in bytes: LRU window, frequency-duel admission, segmented LRU main."""

    name = "wtinylfu"

    def __init__(
        self,
        capacity_bytes: int,
        *,
        window_fraction: float = 0.01,
        protected_fraction: float = 0.8,
        sample_factor: int = 10,
    ) -> None:
        """``window_fraction`` of the bytes is the window; ``protected_fraction`` of the rest is
        the protected segment; frequencies age every ``sample_factor x`` resident items."""
        super().__init__(capacity_bytes)
        if not 0 < window_fraction < 1 or not 0 < protected_fraction < 1:
            raise InvalidArgument("window_fraction and protected_fraction must be in (0, 1)")
        self._window_target = max(1, int(capacity_bytes * window_fraction))
        self._main_target = capacity_bytes - self._window_target
        self._protected_target = int(self._main_target * protected_fraction)
        self._sample_factor = sample_factor
        self._window: OrderedDict[str, None] = OrderedDict()
        self._probation: OrderedDict[str, None] = OrderedDict()
        self._protected: OrderedDict[str, None] = OrderedDict()
        self._window_bytes = 0
        self._probation_bytes = 0
        self._protected_bytes = 0
        self._counter = FrequencyCounter(sample_size=1024 * sample_factor)

    def _count(self, key: str) -> None:
        counter = self._counter
        # The sample period follows the number of resident items, which variable sizes hide.
        counter.sample_size = self._sample_factor * max(1024, len(self._sizes))
        counter.increment(key)

    def _should_admit(self, key: str, size: int) -> bool:
        self._count(key)
        return True

    def _on_insert(self, key: str, size: int) -> None:
        self._window[key] = None
        self._window_bytes += size
        # While main has room (a cache still filling) the window's overflow moves there at
        # once, so the window stays small and no later call inherits a backlog.
        window, sizes = self._window, self._sizes
        while self._window_bytes > self._window_target and len(window) > 1:
            candidate = next(iter(window))
            moved = sizes[candidate]
            if self._probation_bytes + self._protected_bytes + moved > self._main_target:
                break
            del window[candidate]
            self._window_bytes -= moved
            self._probation[candidate] = None
            self._probation_bytes += moved

    def _on_hit(self, key: str) -> None:
        self._count(key)
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._protected:
            self._protected.move_to_end(key)
        elif key in self._probation:
            size = self._sizes[key]
            del self._probation[key]
            self._probation_bytes -= size
            self._protected[key] = None
            self._protected_bytes += size
            self._demote_protected()

    def _demote_protected(self) -> None:
        while self._protected_bytes > self._protected_target and len(self._protected) > 1:
            key = self._protected.popitem(last=False)[0]
            size = self._sizes[key]
            self._protected_bytes -= size
            self._probation[key] = None
            self._probation_bytes += size

    def _choose_victims(self, bytes_needed: int) -> list[str]:
        if self._window and self._window_bytes + bytes_needed > self._window_target:
            return self._settle_window_candidate()
        for segment in (self._probation, self._protected, self._window):
            if segment:
                key = segment.popitem(last=False)[0]
                self._account_removal(segment, self._sizes[key])
                return [key]
        raise self._nothing_to_evict()

    def _settle_window_candidate(self) -> list[str]:
        """Move the window's LRU item into main, or evict it, or evict what it displaces."""
        candidate = next(iter(self._window))
        size = self._sizes[candidate]
        del self._window[candidate]
        self._window_bytes -= size
        room = self._main_target - self._probation_bytes - self._protected_bytes
        displaced: list[str] = []
        displaced_bytes = 0
        if room < size:
            # The main items the candidate would push out, coldest first.
            queue = itertools.chain(self._probation, self._protected)
            for key in queue:
                displaced.append(key)
                displaced_bytes += self._sizes[key]
                if room + displaced_bytes >= size:
                    break
            else:
                return [candidate]
            frequency = self._counter.frequency
            if frequency(candidate) <= sum(frequency(key) for key in displaced):
                return [candidate]
            for key in displaced:
                segment = self._probation if key in self._probation else self._protected
                del segment[key]
                self._account_removal(segment, self._sizes[key])
        self._probation[candidate] = None
        self._probation_bytes += size
        return displaced

    def _account_removal(self, segment: OrderedDict[str, None], size: int) -> None:
        if segment is self._window:
            self._window_bytes -= size
        elif segment is self._probation:
            self._probation_bytes -= size
        else:
            self._protected_bytes -= size

    def _unlink(self, key: str) -> None:
        for segment in (self._window, self._probation, self._protected):
            if key in segment:
                del segment[key]
                self._account_removal(segment, self._sizes[key])
                return

    def _relink(self, key: str) -> None:
        self._probation[key] = None
        self._probation_bytes += self._sizes[key]
