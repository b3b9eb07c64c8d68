"""Belady's farthest-next-use reference with bypass, compiled: the same decisions as
``catalog.plan.curves.replay_belady_ids`` (and ``catalog.cache.replay.replay_belady``), over
integer key ids (arguments as in ``fifo``).

The Python heap holds ``(-next use, key)``: equal next uses (keys never requested again) are
broken by the smaller key id. Here the heap's priority is ``-next use`` (exact as a double below
2^53) and its sequence the key id, which orders the entries the same way.
"""

from __future__ import annotations

import numpy as np

from catalog.plan.compiled._jit import jit
from catalog.plan.compiled.structures import (
    IntArray,
    heap_arrays,
    heap_pop,
    heap_push,
    key_space,
    record_eviction,
)


@jit
def next_uses(ids: IntArray) -> IntArray:
    """For each position, the next position of the same id (``len(ids)`` if none)."""
    never = len(ids)
    upcoming = np.empty(never, dtype=np.int64)
    seen = np.full(key_space(ids), never, dtype=np.int64)
    for position in range(never - 1, -1, -1):
        key = ids[position]
        upcoming[position] = seen[key]
        seen[key] = position
    return upcoming


@jit
def replay_belady(
    ids: IntArray, charged: IntArray, carried: IntArray, capacity: int, start: int, log: IntArray
) -> tuple[int, int, int]:
    """On a miss evict the farthest-next-used items; bypass the requested one when it is
    needed later than everything it would displace, or never again."""
    keys = key_space(ids)
    never = len(ids)
    upcoming = next_uses(ids)
    # priority: -next use; sequence: the key (the tie-break)
    heap_priority, heap_sequence, heap_keys = heap_arrays(never + 1)
    chosen_priority = np.empty(keys + 1, dtype=np.float64)
    chosen_keys = np.empty(keys + 1, dtype=np.int64)
    size = 0
    cached = np.zeros(keys, dtype=np.bool_)
    next_of = np.zeros(keys, dtype=np.int64)
    charge_of = np.zeros(keys, dtype=np.int64)
    used = hits = hit_bytes = evictions = 0
    for position in range(never):
        key = ids[position]
        charge = charged[position]
        following = upcoming[position]
        if cached[key]:
            if position >= start:
                hits += 1
                hit_bytes += carried[position]
            next_of[key] = following
            size = heap_push(
                heap_priority, heap_sequence, heap_keys, size, float(-following), key, key
            )
            continue
        if following == never or charge > capacity:
            continue
        if used + charge > capacity:
            count = 0
            freed = 0
            while used - freed + charge > capacity:
                negated, _, victim, size = heap_pop(heap_priority, heap_sequence, heap_keys, size)
                if not (cached[victim] and next_of[victim] == -negated):
                    continue  # stale
                if -negated < following:
                    size = heap_push(
                        heap_priority, heap_sequence, heap_keys, size, negated, victim, victim
                    )
                    break
                chosen_priority[count] = negated
                chosen_keys[count] = victim
                count += 1
                freed += charge_of[victim]
            if used - freed + charge > capacity:
                # Everything it would displace is needed sooner: do not cache it.
                for index in range(count):
                    size = heap_push(
                        heap_priority,
                        heap_sequence,
                        heap_keys,
                        size,
                        chosen_priority[index],
                        chosen_keys[index],
                        chosen_keys[index],
                    )
                continue
            for index in range(count):
                victim = chosen_keys[index]
                cached[victim] = False
                used -= charge_of[victim]
                evictions = record_eviction(log, evictions, victim)
        cached[key] = True
        next_of[key] = following
        charge_of[key] = charge
        used += charge
        size = heap_push(heap_priority, heap_sequence, heap_keys, size, float(-following), key, key)
    return hits, hit_bytes, evictions
