"""A cache of Resolve answers, valid while the index's generation is unchanged.

A resolve makes about fifteen LMDB calls (its B-tree walks over a map of hundreds of MB at 10^6
revisions), and py-lmdb releases the GIL around each; a cached answer costs one (the generation
read) and a dictionary lookup. Serving traffic resolves the same hot refs over and over (engines
re-resolve ``t/a@serving`` before each attach), so the answer is cached per ref.

Correctness: ``compute`` returns its answer with the generation of the state it read (one LMDB
snapshot; ``None`` when a write committed during a lookup that spans several reads). An answer is
stored under that generation and served only while the current generation still equals it.
Every committed write (alias move, push, delete, reindex swap) changes the generation, so a
cached answer is never older than the last write that finished before the request arrived.
Errors are not cached.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: Entries kept; past this the cache starts over (cheaper than LRU bookkeeping per hit).
DEFAULT_ENTRIES = 1 << 16


class GenerationCache(Generic[T]):
    """Answers per key, tagged with the generation (of the index behind them) they hold at.

    ``generation`` returns an opaque token that changes whenever an answer may have changed.
    """

    def __init__(self, generation: Callable[[], object], entries: int = DEFAULT_ENTRIES) -> None:
        if entries < 1:
            raise ValueError(f"a cache needs room for at least one entry, got {entries}")
        self._generation = generation
        self._entries = entries
        self._cache: dict[str, tuple[object, T]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, compute: Callable[[], tuple[object | None, T]]) -> T:
        """The cached answer for ``key`` at the current generation, or the answer of
        ``compute()``, which returns ``(generation it answered at or None, answer)`` and may
        raise (nothing is stored then, nor for a ``None`` generation)."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] == self._generation():
            self.hits += 1
            return hit[1]
        self.misses += 1
        generation, value = compute()
        if generation is not None:
            with self._lock:
                if len(self._cache) >= self._entries:
                    self._cache.clear()
                self._cache[key] = (generation, value)
        return value

    def __len__(self) -> int:
        return len(self._cache)
