"""The eviction-policy interface: ``EvictionPolicy``, the bookkeeping every policy shares.

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

The policies themselves live beside this module (:mod:`catalog.cache.recency_policies`,
:mod:`catalog.cache.tinylfu`, :mod:`catalog.cache.size_aware_policies`); the registry that names
them is :mod:`catalog.cache.policies`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from catalog.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

__all__ = ["EvictionPolicy"]


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

    def _nothing_to_evict(self) -> Internal:
        """The error ``_choose_victims`` raises when it finds no unpinned key: ``victims``
        checks the pinned bytes first, so it means the policy's own structures are wrong."""
        return Internal(
            f"{self.name}: nothing evictable with {self._used} of "
            f"{self._capacity} bytes used, {self._pinned_bytes} pinned"
        )
