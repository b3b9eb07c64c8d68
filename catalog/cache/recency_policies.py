"""The recency policies: ``lru``, the baseline, and ``s3fifo``.

* ``lru`` - least recently used.
* ``s3fifo`` - S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO (10% of the bytes), a
  main FIFO with lazy reinsertion of items hit while queued, and a ghost queue of keys recently
  evicted from the small FIFO so that their return goes straight to main. Scan resistant.

Both are O(1) per operation. The compiled replays (:mod:`catalog.plan.compiled.fifo`) make the
same decisions; a change here must be made there too.
"""

from __future__ import annotations

from collections import OrderedDict

from catalog.cache.eviction_policy import EvictionPolicy
from catalog.errors import InvalidArgument

__all__ = ["LRU", "S3FIFO"]


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
            raise self._nothing_to_evict()
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
                raise self._nothing_to_evict()
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
