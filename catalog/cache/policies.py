"""The eviction policies by name: ``POLICIES``, ``DEFAULT_POLICY``, ``make_policy``.

Every policy follows the request protocol of :class:`EvictionPolicy`
(:mod:`catalog.cache.eviction_policy`, which says it in full): ``admit`` on a miss, ``victims``
to make room, ``record_insert``, ``record_hit``; pinned keys are never victims. Each family lives
in its own module, whose docstring says how its policies decide:

* ``lru``, ``s3fifo`` (S3-FIFO, SOSP'23): recency, :mod:`catalog.cache.recency_policies`.
* ``wtinylfu`` (W-TinyLFU, ToS'17; Caffeine): frequency-duel admission,
  :mod:`catalog.cache.tinylfu`.
* ``gdsf`` (Greedy-Dual-Size-Frequency) and ``lrfu-size`` (size-aware LRFU with admission by
  rank, the default): value per byte in a heap, :mod:`catalog.cache.size_aware_policies`.

This module is where callers import them from (the names below are re-exported); the compiled
replays (:mod:`catalog.plan.compiled`) are tested to decide exactly as these classes do.
"""

from __future__ import annotations

from collections.abc import Callable

from catalog.cache.eviction_policy import EvictionPolicy
from catalog.cache.recency_policies import LRU, S3FIFO
from catalog.cache.size_aware_policies import GDSF, HeapRankedPolicy, SizeAwareLRFU
from catalog.cache.tinylfu import FrequencyCounter, WTinyLFU
from catalog.errors import InvalidArgument

__all__ = [
    "DEFAULT_POLICY",
    "GDSF",
    "LRU",
    "POLICIES",
    "S3FIFO",
    "EvictionPolicy",
    "FrequencyCounter",
    "HeapRankedPolicy",
    "PolicyFactory",
    "SizeAwareLRFU",
    "WTinyLFU",
    "make_policy",
    "resolve_policy_name",
]

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
