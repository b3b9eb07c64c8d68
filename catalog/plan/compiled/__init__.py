"""Compiled replays of every eviction policy and of Belady's reference, and the LRU stack
distances, for ``loracat plan``.

``catalog.cache.policies`` stays the source of truth (the catalog runs those classes); these are
the same algorithms with the same parameters, compiled with numba over integer key ids so that a
plan's few hundred replays take seconds instead of minutes. ``tests/plan/test_compiled.py``
replays random traces through both and requires the same hits, hit bytes and evictions, in the
same order.

numba is imported on first use (a plan needs it; nothing else does). The first call on a machine
compiles the kernels (seconds) and caches the machine code on disk (see ``_jit``);
:func:`compile_kernels` does it up front, before worker threads start. The stack distances
(:func:`distinct_since_previous`) are exact counts, checked against the LRU policy object by
``tests/plan/test_stack.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from catalog.errors import InvalidArgument

if TYPE_CHECKING:
    IntArray = npt.NDArray[np.int64]
    Kernel = Callable[[IntArray, IntArray, IntArray, int, int, IntArray], tuple[int, int, int]]

#: The name Belady's reference goes by beside the policies.
BELADY = "belady"


def _kernels() -> dict[str, Kernel]:
    # Imported here: importing numba and loading the cached kernels costs about a second.
    from catalog.plan.compiled.belady import replay_belady
    from catalog.plan.compiled.fifo import replay_lru, replay_s3fifo
    from catalog.plan.compiled.greedy_dual import replay_gdsf, replay_lrfu_size
    from catalog.plan.compiled.tinylfu import replay_wtinylfu

    return {
        "lru": replay_lru,
        "s3fifo": replay_s3fifo,
        "wtinylfu": replay_wtinylfu,
        "gdsf": replay_gdsf,
        "lrfu-size": replay_lrfu_size,
        BELADY: replay_belady,
    }


#: Every policy with a compiled replay (the registry names of ``catalog.cache.policies``), and
#: Belady's reference.
COMPILED = ("lru", "s3fifo", "wtinylfu", "gdsf", "lrfu-size", BELADY)


def replay_ids(
    policy: str,
    ids: npt.ArrayLike,
    charged: npt.ArrayLike,
    carried: npt.ArrayLike,
    capacity: int,
    *,
    start: int = 0,
    log: bool = False,
) -> tuple[int, int, list[int]]:
    """Replay requests for key ``ids`` through the compiled ``policy`` at ``capacity``.

    Each request charges ``charged`` against the capacity (1 per slot, or its bytes) and carries
    ``carried`` bytes; the first ``start`` requests are replayed but not counted. Returns hits,
    hit bytes, and the evicted ids in eviction order when ``log`` (else an empty list).

    Raises:
        InvalidArgument: an unknown policy, a capacity that is not positive, arrays of
            different lengths, a negative id or a charge that is not positive.
    """
    if policy not in COMPILED:
        raise InvalidArgument(f"no compiled replay for {policy!r}; known: {', '.join(COMPILED)}")
    if type(capacity) is not int or capacity <= 0:
        raise InvalidArgument(f"capacity must be a positive integer, got {capacity!r}")
    # Contiguous and writeable: the array type compile_kernels() compiled for (a read-only
    # array is another type to numba, and would compile again inside a worker thread).
    id_array = np.require(ids, np.int64, ["C", "W"])
    charge_array = np.require(charged, np.int64, ["C", "W"])
    carried_array = np.require(carried, np.int64, ["C", "W"])
    if not len(id_array) == len(charge_array) == len(carried_array):
        raise InvalidArgument("ids, charged and carried must have one entry per request")
    if len(id_array) and (id_array.min() < 0 or charge_array.min() <= 0):
        raise InvalidArgument("ids must be >= 0 and charges positive")
    evicted = np.empty(len(id_array) if log else 0, dtype=np.int64)
    kernel = _kernels()[policy]
    hits, hit_bytes, evictions = kernel(
        id_array, charge_array, carried_array, capacity, int(start), evicted
    )
    return int(hits), int(hit_bytes), evicted[:evictions].tolist() if log else []


def distinct_since_previous(
    sizes: npt.ArrayLike, previous: npt.ArrayLike
) -> tuple[IntArray, IntArray]:
    """Per request, the number and bytes of the distinct other keys requested since the same
    key's ``previous`` request (a position, -1 for a first request; then both are 0)."""
    from catalog.plan.compiled.stack_distance import distinct_since_previous as kernel

    return kernel(
        np.require(sizes, np.int64, ["C", "W"]), np.require(previous, np.int64, ["C", "W"])
    )


def compile_kernels() -> None:
    """Compile (or load from the on-disk cache) every kernel, with the argument types a plan
    passes, so that worker threads never compile at once."""
    ids = np.array([0, 1, 0, 2, 1, 0], dtype=np.int64)
    ones = np.ones(len(ids), dtype=np.int64)
    for kernel in _kernels().values():
        kernel(ids, ones, ones, 2, 0, np.empty(0, dtype=np.int64))
    distinct_since_previous(ones, np.array([-1, -1, 0, -1, 1, 2], dtype=np.int64))
