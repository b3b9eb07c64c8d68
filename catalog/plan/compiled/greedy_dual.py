"""GDSF and size-aware LRFU compiled: the same decisions as ``catalog.cache.policies.GDSF`` and
``SizeAwareLRFU`` (default parameters; defined in ``catalog.cache.size_aware_policies``) under
the replay protocol, over integer key ids (arguments as in ``fifo``).

Both rank resident keys in a heap with lazy deletion. The floating-point arithmetic is the
Python policies', operation for operation (IEEE doubles, the same libm ``pow``), and the heap
keeps the same entries (stale ones, the compaction at ``2 x ranked + 1024`` entries), so ties
and stale entries resolve the same way. The heap arrays hold one entry per request plus one per
key: no more can be pushed between two rebuilds.
"""

from __future__ import annotations

import math

import numpy as np

from catalog.plan.compiled._jit import jit
from catalog.plan.compiled.structures import (
    IntArray,
    heap_arrays,
    heap_drop_stale,
    heap_pop,
    heap_push,
    key_space,
    record_eviction,
)

_MIB = 1_048_576


@jit
def replay_gdsf(
    ids: IntArray, charged: IntArray, carried: IntArray, capacity: int, start: int, log: IntArray
) -> tuple[int, int, int]:
    """Greedy-Dual-Size-Frequency: evict the lowest ``clock + hits x 2^20 / size``."""
    keys = key_space(ids)
    room = len(ids) + keys + 1
    heap_priority, heap_sequence, heap_keys = heap_arrays(room)
    size = 0
    sequence = 0
    resident = np.zeros(keys, dtype=np.bool_)
    ranked = np.zeros(keys, dtype=np.bool_)  # GDSF._ranking (catalog.cache.lazy_heap) holds the key
    current = np.zeros(keys, dtype=np.float64)
    hit_count = np.zeros(keys, dtype=np.int64)
    charge_of = np.zeros(keys, dtype=np.int64)
    ranked_count = 0
    clock = 0.0
    used = hits = hit_bytes = evictions = 0
    for position in range(len(ids)):
        key = ids[position]
        charge = charged[position]
        if resident[key]:
            if position >= start:
                hits += 1
                hit_bytes += carried[position]
            hit_count[key] += 1
            if not ranked[key]:
                continue
        else:
            if charge > capacity:
                continue
            while used + charge > capacity:
                while True:
                    priority, _, victim, size = heap_pop(
                        heap_priority, heap_sequence, heap_keys, size
                    )
                    if ranked[victim] and current[victim] == priority:
                        break
                ranked[victim] = False
                ranked_count -= 1
                hit_count[victim] = 0
                clock = priority
                resident[victim] = False
                used -= charge_of[victim]
                evictions = record_eviction(log, evictions, victim)
            resident[key] = True
            charge_of[key] = charge
            used += charge
            hit_count[key] = 1
        # GDSF._push
        priority = clock + hit_count[key] * _MIB / charge_of[key]
        if not ranked[key]:
            ranked[key] = True
            ranked_count += 1
        current[key] = priority
        size = heap_push(heap_priority, heap_sequence, heap_keys, size, priority, sequence, key)
        sequence += 1
        if size > 2 * ranked_count + 1024:
            size = heap_drop_stale(heap_priority, heap_sequence, heap_keys, size, current, ranked)
    return hits, hit_bytes, evictions


_RESCALE_AT = 2.0**16
_FORGET_BELOW = 2.0**-16
_RETUNE_EVERY = 1024
_MIN_ITEMS = 64
_EXPONENT = 0.6
_HALF_LIFE_PER_KEY = 2.0
_HALF_LIFE_LOW = 10.0
_HALF_LIFE_HIGH = 128.0


@jit
def replay_lrfu_size(
    ids: IntArray, charged: IntArray, carried: IntArray, capacity: int, start: int, log: IntArray
) -> tuple[int, int, int]:
    """Size-aware LRFU: rank by decayed request count / size^0.6, admit by rank."""
    keys = key_space(ids)
    room = len(ids) + keys + 1
    heap_priority, heap_sequence, heap_keys = heap_arrays(room)
    looked = np.empty(keys + 1, dtype=np.int64)  # positions in `looked_*` below
    looked_priority = np.empty(keys + 1, dtype=np.float64)
    looked_sequence = np.empty(keys + 1, dtype=np.int64)
    size = 0
    sequence = 0
    resident = np.zeros(keys, dtype=np.bool_)
    resident_count = 0
    charge_of = np.zeros(keys, dtype=np.int64)
    value = np.zeros(keys, dtype=np.float64)
    valued = np.zeros(keys, dtype=np.bool_)  # SizeAwareLRFU._value holds the key
    valued_count = 0
    ranked = np.zeros(keys, dtype=np.bool_)  # SizeAwareLRFU._ranking holds the key
    ranked_count = 0
    current = np.zeros(keys, dtype=np.float64)
    # The order of SizeAwareLRFU._ranking.keys(): when each key entered it.
    entered = np.zeros(keys, dtype=np.int64)
    entries = 0
    weight = 1.0
    growth = 1.0
    until_retune = 0
    used = hits = hit_bytes = evictions = 0
    for position in range(len(ids)):
        key = ids[position]
        charge = charged[position]
        hit = resident[key]
        if not hit and charge > capacity:
            continue  # admit() refuses before counting
        # SizeAwareLRFU._count
        if until_retune <= 0:
            items = max(_MIN_ITEMS, resident_count)
            half_life = min(
                max(_HALF_LIFE_LOW * items, _HALF_LIFE_PER_KEY * valued_count),
                _HALF_LIFE_HIGH * items,
            )
            growth = 2.0 ** (1.0 / half_life)
            until_retune = _RETUNE_EVERY
        until_retune -= 1
        weight *= growth
        if weight >= _RESCALE_AT:
            # _rescale: divide every value by the weight, forget the long-unrequested keys,
            # then rank again in the dict's order.
            factor = 1.0 / weight
            for other in range(keys):
                if valued[other]:
                    scaled = value[other] * factor
                    if scaled >= _FORGET_BELOW or resident[other]:
                        value[other] = scaled
                    else:
                        valued[other] = False
                        value[other] = 0.0
                        valued_count -= 1
            weight = 1.0
            order = np.argsort(np.where(ranked, entered, np.iinfo(np.int64).max), kind="stable")
            size = 0
            for index in range(ranked_count):
                other = order[index]
                priority = value[other] / math.pow(charge_of[other], _EXPONENT)
                current[other] = priority
                entered[other] = entries
                entries += 1
                size = heap_push(
                    heap_priority, heap_sequence, heap_keys, size, priority, sequence, other
                )
                sequence += 1
        if not valued[key]:
            valued[key] = True
            valued_count += 1
            value[key] = 0.0
        value[key] = value[key] + weight
        if hit:
            if position >= start:
                hits += 1
                hit_bytes += carried[position]
            if not ranked[key]:
                continue
        else:
            shortfall = used + charge - capacity
            if shortfall > 0:
                # Admit only if everything it would displace ranks below it: pop to look,
                # push back what was looked at (stale entries popped on the way are dropped).
                score = value[key] / math.pow(charge, _EXPONENT)
                count = 0
                freed = 0
                while freed < shortfall:
                    priority, entry_sequence, other, size = heap_pop(
                        heap_priority, heap_sequence, heap_keys, size
                    )
                    if not (ranked[other] and current[other] == priority):
                        continue
                    looked[count] = other
                    looked_priority[count] = priority
                    looked_sequence[count] = entry_sequence
                    count += 1
                    if priority >= score:
                        break
                    freed += charge_of[other]
                for index in range(count):
                    size = heap_push(
                        heap_priority,
                        heap_sequence,
                        heap_keys,
                        size,
                        looked_priority[index],
                        looked_sequence[index],
                        looked[index],
                    )
                if freed < shortfall:
                    continue
                while used + charge > capacity:
                    while True:
                        priority, _, victim, size = heap_pop(
                            heap_priority, heap_sequence, heap_keys, size
                        )
                        if ranked[victim] and current[victim] == priority:
                            break
                    ranked[victim] = False
                    ranked_count -= 1
                    resident[victim] = False
                    resident_count -= 1
                    used -= charge_of[victim]
                    evictions = record_eviction(log, evictions, victim)
            resident[key] = True
            resident_count += 1
            charge_of[key] = charge
            used += charge
        # SizeAwareLRFU._push
        priority = value[key] / math.pow(charge_of[key], _EXPONENT)
        if not ranked[key]:
            ranked[key] = True
            ranked_count += 1
            entered[key] = entries
            entries += 1
        current[key] = priority
        size = heap_push(heap_priority, heap_sequence, heap_keys, size, priority, sequence, key)
        sequence += 1
        if size > 2 * ranked_count + 1024:
            size = heap_drop_stale(heap_priority, heap_sequence, heap_keys, size, current, ranked)
    return hits, hit_bytes, evictions
