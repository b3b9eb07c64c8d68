"""Eviction policies for byte-bounded caches of variable-size items (pack digests).

A policy does the bookkeeping; the cache that uses it owns the bytes. On every request the cache
tells the policy what happened, in this order::

    if key in policy:                      # hit
        policy.record_hit(key)
    elif policy.admit(key, size):          # miss: the policy may refuse to cache it
        for victim in policy.victims(size):
            store.delete(victim)           # the policy has already forgotten the victim
        store.put(key, data)
        policy.record_insert(key, size)

A pinned key (``pin``/``unpin``, counted) is never a victim; its bytes still count against the
capacity. Every operation is O(1) amortised, or O(log n) for the heap-based policies.

Policies (``POLICIES``):

* ``lru`` - least recently used, the baseline.
* ``s3fifo`` - S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO (10% of the bytes), a
  main FIFO with lazy reinsertion of items hit while queued, and a ghost queue of keys recently
  evicted from the small FIFO so that their return goes straight to main. Scan resistant.
* ``wtinylfu`` - W-TinyLFU (Einziger et al., ToS'17; Caffeine): a small LRU window, then an
  admission duel into a segmented LRU main decided by request frequency, sized by bytes: the
  candidate enters main only if it was requested more often than all the main items it would
  displace together. Frequencies are exact counts, halved every ``10 x`` resident-item count
  requests (the aging of the count-min sketch, without its hash collisions; at 10^6 keys the exact
  table is affordable, and deterministic across runs).
* ``gdsf`` - Greedy-Dual-Size-Frequency (Cherkasova '98): evicts the lowest
  ``clock + hits / size``; hits count only while resident. O(log n).
* ``lrfu-size`` - size-aware LRFU (Lee et al., '01) with TinyLFU-style admission: every request
  adds a weight that doubles every half-life, so a key's value is its exponentially decayed
  request count (recency and frequency in one number, kept for recently evicted keys too). Items
  rank by ``value / size ** size_exponent``; the lowest-ranked go first, and a missed item is
  cached only if everything it would displace ranks below it, which also makes it scan
  resistant. Ranking by value per byte is the greedy answer to the knapsack that caching
  variable sizes is; the default exponent (0.6) keeps most of that gain in request hit rate
  while giving up less byte hit rate than 1.0 would. The half-life is about twice the number of
  keys the workload touches, in requests. O(log n) (a heap with lazy deletion,
  :mod:`catalog.cache.lazy_heap`, shared with ``gdsf``).
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable

from catalog.cache.lazy_heap import Entry, LazyMinHeap
from catalog.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)


def _check_size(key: str, size: int) -> None:
    if type(size) is not int or size <= 0:
        raise InvalidArgument(f"size of {key} must be a positive integer, got {size!r}")


class EvictionPolicy(ABC):
    """Bookkeeping for a cache of variable-size items bounded by ``capacity_bytes``.

    Subclasses implement the hooks (``_on_insert``, ``_on_hit``, ``_choose_victims``,
    ``_unlink``, ``_relink``, ``_forget`` and optionally ``_should_admit``); this class keeps the
    sizes, the byte count and the pins, and checks every call. A pinned key is taken out of the
    subclass's eviction structures (``_unlink``) until its last pin goes (``_relink``), so
    eviction never has to skip over pinned items.

    Not thread-safe: the cache that owns a policy serialises calls under its own lock.
    """

    #: The registry name.
    name: str = ""

    def __init__(self, capacity_bytes: int) -> None:
        """Raises ``InvalidArgument`` when ``capacity_bytes`` is not a positive integer."""
        if type(capacity_bytes) is not int or capacity_bytes <= 0:
            raise InvalidArgument(
                f"cache capacity must be a positive number of bytes, got {capacity_bytes!r}"
            )
        self._capacity = capacity_bytes
        self._used = 0
        self._sizes: dict[str, int] = {}
        self._pins: dict[str, int] = {}
        self._pinned_bytes = 0

    # --- state ----------------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of every resident item, pinned ones included."""
        return self._used

    @property
    def pinned_bytes(self) -> int:
        return self._pinned_bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def size_of(self, key: str) -> int:
        """The size recorded for a resident ``key``; raises ``NotFound`` when it is not cached."""
        try:
            return self._sizes[key]
        except KeyError:
            raise NotFound(f"{key} is not in the cache") from None

    def is_pinned(self, key: str) -> bool:
        return key in self._pins

    # --- the request protocol ---------------------------------------------------------------------

    def admit(self, key: str, size: int) -> bool:
        """Called once per miss of ``key``: should the cache store it?

        Frequency-aware policies count the request here. ``False`` when the item cannot fit
        beside the pinned bytes, or when the policy judges it not worth caching.

        Raises:
            InvalidArgument: ``size`` is not a positive integer.
            AlreadyExists: ``key`` is cached already (that is a hit, not a miss).
        """
        _check_size(key, size)
        if key in self._sizes:
            raise AlreadyExists(f"{key} is cached already; record a hit instead")
        return size <= self._capacity - self._pinned_bytes and self._should_admit(key, size)

    def victims(self, bytes_needed: int) -> list[str]:
        """Evict until ``bytes_needed`` more bytes fit; return the evicted keys, oldest first.

        The policy forgets the victims before returning, so the caller must drop their bytes.
        Pinned keys are never chosen.

        Raises:
            InvalidArgument: ``bytes_needed`` is negative.
            ResourceExhausted: more than the unpinned capacity is asked for (``admit`` says
                ``False`` for such items, so a cache following the protocol never sees this).
        """
        if type(bytes_needed) is not int or bytes_needed < 0:
            raise InvalidArgument(f"bytes_needed must be a non-negative integer: {bytes_needed!r}")
        if bytes_needed > self._capacity - self._pinned_bytes:
            raise ResourceExhausted(
                f"{bytes_needed} bytes cannot fit: capacity {self._capacity}, "
                f"pinned {self._pinned_bytes}"
            )
        evicted: list[str] = []
        sizes = self._sizes
        while self._used + bytes_needed > self._capacity:
            for key in self._choose_victims(bytes_needed):
                self._used -= sizes.pop(key)
                evicted.append(key)
        return evicted

    def record_insert(self, key: str, size: int) -> None:
        """``key`` (``size`` bytes) is now stored; make room first with :meth:`victims`.

        Raises:
            InvalidArgument: ``size`` is not a positive integer.
            AlreadyExists: ``key`` is cached already.
            ResourceExhausted: it does not fit in the free bytes.
        """
        _check_size(key, size)
        if key in self._sizes:
            raise AlreadyExists(f"{key} is cached already")
        if self._used + size > self._capacity:
            raise ResourceExhausted(
                f"{key} ({size} bytes) does not fit: {self._capacity - self._used} bytes free; "
                "call victims() first"
            )
        self._sizes[key] = size
        self._used += size
        self._on_insert(key, size)

    def record_hit(self, key: str) -> None:
        """A request for a cached ``key`` was served from the cache.

        Raises:
            NotFound: ``key`` is not cached.
        """
        if key not in self._sizes:
            raise NotFound(f"{key} is not in the cache")
        self._on_hit(key)

    def remove(self, key: str) -> None:
        """Forget ``key`` (deleted upstream, or its cached bytes were found corrupt).

        Raises:
            NotFound: ``key`` is not cached.
            FailedPrecondition: ``key`` is pinned.
        """
        if key not in self._sizes:
            raise NotFound(f"{key} is not in the cache")
        if key in self._pins:
            raise FailedPrecondition(f"{key} is pinned {self._pins[key]} time(s); unpin it first")
        self._unlink(key)
        self._forget(key)
        self._used -= self._sizes.pop(key)

    def pin(self, key: str) -> None:
        """Protect a cached ``key`` from eviction; pins are counted.

        Raises:
            NotFound: ``key`` is not cached.
        """
        if key not in self._sizes:
            raise NotFound(f"{key} is not in the cache")
        count = self._pins.get(key, 0)
        if count == 0:
            self._unlink(key)
            self._pinned_bytes += self._sizes[key]
        self._pins[key] = count + 1

    def unpin(self, key: str) -> None:
        """Drop one pin of ``key``; with the last one it becomes evictable again.

        Raises:
            FailedPrecondition: ``key`` is not pinned.
        """
        count = self._pins.get(key, 0)
        if count == 0:
            raise FailedPrecondition(f"{key} is not pinned")
        if count > 1:
            self._pins[key] = count - 1
            return
        del self._pins[key]
        self._pinned_bytes -= self._sizes[key]
        self._relink(key)

    # --- hooks ------------------------------------------------------------------------------------

    def _should_admit(self, key: str, size: int) -> bool:
        """The policy's own admission test (capacity and pins are checked by the caller)."""
        return True

    @abstractmethod
    def _on_insert(self, key: str, size: int) -> None:
        """Place a new key; ``self._sizes`` has it already."""

    @abstractmethod
    def _on_hit(self, key: str) -> None:
        """Account for a hit; the key may be pinned (hence unlinked)."""

    @abstractmethod
    def _choose_victims(self, bytes_needed: int) -> list[str]:
        """Unlink and forget one or more unpinned keys (or only reorganise, returning ``[]``).

        Called while the cache lacks room for ``bytes_needed``; each call must make progress.
        """

    @abstractmethod
    def _unlink(self, key: str) -> None:
        """Take a resident key out of the eviction structures (it is being pinned or removed)."""

    @abstractmethod
    def _relink(self, key: str) -> None:
        """Put an unpinned key back into the eviction structures."""

    def _forget(self, key: str) -> None:  # noqa: B027 - optional hook
        """Drop per-key state kept beside the eviction structures (after ``_unlink``)."""


def _nothing_to_evict(policy: EvictionPolicy) -> Internal:
    return Internal(
        f"{policy.name}: nothing evictable with {policy.used_bytes} of "
        f"{policy.capacity_bytes} bytes used, {policy.pinned_bytes} pinned"
    )


class LRU(EvictionPolicy):
    """Least recently used: the baseline."""

    name = "lru"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._order: OrderedDict[str, None] = OrderedDict()

    def _on_insert(self, key: str, size: int) -> None:
        self._order[key] = None

    def _on_hit(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def _choose_victims(self, bytes_needed: int) -> list[str]:
        if not self._order:
            raise _nothing_to_evict(self)
        return [self._order.popitem(last=False)[0]]

    def _unlink(self, key: str) -> None:
        del self._order[key]

    def _relink(self, key: str) -> None:
        self._order[key] = None


class S3FIFO(EvictionPolicy):
    """S3-FIFO: small FIFO + main FIFO + ghost keys, in bytes (see the module docstring)."""

    name = "s3fifo"

    def __init__(
        self, capacity_bytes: int, *, small_fraction: float = 0.1, promote_after: int = 1
    ) -> None:
        """``promote_after``: hits in the small FIFO that earn a place in main."""
        super().__init__(capacity_bytes)
        if not 0 < small_fraction < 1:
            raise InvalidArgument(f"small_fraction must be in (0, 1), got {small_fraction}")
        self._small_target = max(1, int(capacity_bytes * small_fraction))
        self._ghost_limit = capacity_bytes - self._small_target
        self._promote_after = promote_after
        self._small: OrderedDict[str, None] = OrderedDict()
        self._main: OrderedDict[str, None] = OrderedDict()
        self._small_bytes = 0
        self._main_bytes = 0
        self._freq: dict[str, int] = {}
        self._ghost: OrderedDict[str, int] = OrderedDict()
        self._ghost_bytes = 0

    def _on_insert(self, key: str, size: int) -> None:
        self._freq[key] = 0
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is not None:
            self._ghost_bytes -= ghost_size
            self._main[key] = None
            self._main_bytes += size
        else:
            self._small[key] = None
            self._small_bytes += size

    def _on_hit(self, key: str) -> None:
        freq = self._freq[key]
        if freq < 3:
            self._freq[key] = freq + 1

    def _remember_ghost(self, key: str, size: int) -> None:
        self._ghost[key] = size
        self._ghost_bytes += size
        while self._ghost_bytes > self._ghost_limit:
            self._ghost_bytes -= self._ghost.popitem(last=False)[1]

    def _choose_victims(self, bytes_needed: int) -> list[str]:
        sizes, freq = self._sizes, self._freq
        while True:
            if self._small and (self._small_bytes >= self._small_target or not self._main):
                key = self._small.popitem(last=False)[0]
                size = sizes[key]
                self._small_bytes -= size
                if freq[key] >= self._promote_after:
                    freq[key] = 0
                    self._main[key] = None
                    self._main_bytes += size
                    continue
                del freq[key]
                self._remember_ghost(key, size)
                return [key]
            if not self._main:
                raise _nothing_to_evict(self)
            key = next(iter(self._main))
            count = freq[key]
            if count > 0:
                freq[key] = count - 1
                self._main.move_to_end(key)
                continue
            del self._main[key]
            self._main_bytes -= sizes[key]
            del freq[key]
            return [key]

    def _unlink(self, key: str) -> None:
        if key in self._small:
            del self._small[key]
            self._small_bytes -= self._sizes[key]
        else:
            del self._main[key]
            self._main_bytes -= self._sizes[key]

    def _relink(self, key: str) -> None:
        self._main[key] = None
        self._main_bytes += self._sizes[key]

    def _forget(self, key: str) -> None:
        del self._freq[key]


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
        raise _nothing_to_evict(self)

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


class GDSF(EvictionPolicy):
    """Greedy-Dual-Size-Frequency: evict the lowest ``clock + hits / size`` (O(log n))."""

    name = "gdsf"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._clock = 0.0
        self._hits: dict[str, int] = {}
        self._ranking = LazyMinHeap()  # unpinned resident keys only

    def _push(self, key: str) -> None:
        # Sizes in MiB keep priorities readable; the ratio is all that matters.
        self._ranking.push(key, self._clock + self._hits[key] * 1_048_576 / self._sizes[key])

    def _on_insert(self, key: str, size: int) -> None:
        self._hits[key] = 1
        self._push(key)

    def _on_hit(self, key: str) -> None:
        self._hits[key] += 1
        if key in self._ranking.priorities:
            self._push(key)

    def _choose_victims(self, bytes_needed: int) -> list[str]:
        lowest = self._ranking.pop_lowest()
        if lowest is None:
            raise _nothing_to_evict(self)
        self._clock, key = lowest
        del self._hits[key]
        return [key]

    def _unlink(self, key: str) -> None:
        self._ranking.remove(key)

    def _relink(self, key: str) -> None:
        self._push(key)

    def _forget(self, key: str) -> None:
        del self._hits[key]


class SizeAwareLRFU(EvictionPolicy):
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
        self._ranking = LazyMinHeap()  # unpinned resident keys only

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
        if key in self._ranking.priorities:
            self._push(key)

    def _choose_victims(self, bytes_needed: int) -> list[str]:
        lowest = self._ranking.pop_lowest()
        if lowest is None:
            raise _nothing_to_evict(self)
        return [lowest[1]]

    def _unlink(self, key: str) -> None:
        self._ranking.remove(key)

    def _relink(self, key: str) -> None:
        self._push(key)


PolicyFactory = Callable[[int], EvictionPolicy]

#: Every policy by name; each factory takes the capacity in bytes.
POLICIES: dict[str, PolicyFactory] = {
    LRU.name: LRU,
    S3FIFO.name: S3FIFO,
    WTinyLFU.name: WTinyLFU,
    GDSF.name: GDSF,
    SizeAwareLRFU.name: SizeAwareLRFU,
}

#: The policy used when none is named (``"default"`` resolves to it); see ``bench_policies``.
DEFAULT_POLICY = SizeAwareLRFU.name


def resolve_policy_name(name: str) -> str:
    """The registry name for ``name`` (``"default"`` is :data:`DEFAULT_POLICY`).

    Raises:
        InvalidArgument: no policy has that name.
    """
    resolved = DEFAULT_POLICY if name == "default" else name
    if resolved not in POLICIES:
        known = ", ".join(["default", *sorted(POLICIES)])
        raise InvalidArgument(f"unknown eviction policy {name!r}; known: {known}")
    return resolved


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """A fresh policy by registry name (or ``"default"``) for ``capacity_bytes``.

    Raises:
        InvalidArgument: unknown name, or a capacity that is not a positive integer.
    """
    return POLICIES[resolve_policy_name(name)](capacity_bytes)
