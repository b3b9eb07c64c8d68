"""LRU and S3-FIFO compiled: the same decisions as ``catalog.cache.policies.LRU`` and
``S3FIFO`` (default parameters; defined in ``catalog.cache.recency_policies``) under the replay
protocol, over integer key ids.

Every replay takes ``(ids, charged, carried, capacity, start, log)``: per request its key id,
what it charges against ``capacity`` (1 per slot, or bytes) and the bytes it carries; the first
``start`` requests are replayed but not counted; victims are written to ``log`` in eviction
order when it is not empty (it must then hold one entry per possible eviction, ``len(ids)``).
It returns ``(hits, hit_bytes, evictions)``.
"""

from __future__ import annotations

import numpy as np

from catalog.plan.compiled._jit import jit
from catalog.plan.compiled.structures import (
    IntArray,
    key_space,
    list_append,
    list_move_to_end,
    list_reset,
    list_unlink,
    record_eviction,
)


@jit
def replay_lru(
    ids: IntArray, charged: IntArray, carried: IntArray, capacity: int, start: int, log: IntArray
) -> tuple[int, int, int]:
    """Least recently used (see the module docstring for the arguments)."""
    keys = key_space(ids)
    after = np.empty(keys + 1, dtype=np.int64)
    before = np.empty(keys + 1, dtype=np.int64)
    order = keys  # sentinel: after[order] is the least recently used
    list_reset(after, before, order)
    resident = np.zeros(keys, dtype=np.bool_)
    charge_of = np.zeros(keys, dtype=np.int64)
    used = hits = hit_bytes = evictions = 0
    for position in range(len(ids)):
        key = ids[position]
        charge = charged[position]
        if resident[key]:
            list_move_to_end(after, before, order, key)
            if position >= start:
                hits += 1
                hit_bytes += carried[position]
            continue
        if charge > capacity:
            continue  # admit() refuses what cannot fit
        while used + charge > capacity:
            victim = after[order]
            list_unlink(after, before, victim)
            resident[victim] = False
            used -= charge_of[victim]
            evictions = record_eviction(log, evictions, victim)
        resident[key] = True
        charge_of[key] = charge
        used += charge
        list_append(after, before, order, key)
    return hits, hit_bytes, evictions


_NOWHERE, _SMALL, _MAIN, _GHOST = 0, 1, 2, 3


@jit
def replay_s3fifo(
    ids: IntArray, charged: IntArray, carried: IntArray, capacity: int, start: int, log: IntArray
) -> tuple[int, int, int]:
    """S3-FIFO with a 10% small FIFO, promotion after one hit, ghosts up to main's bytes."""
    keys = key_space(ids)
    small_target = max(1, int(capacity * 0.1))
    ghost_limit = capacity - small_target
    promote_after = 1
    after = np.empty(keys + 3, dtype=np.int64)
    before = np.empty(keys + 3, dtype=np.int64)
    small, main, ghost = keys, keys + 1, keys + 2
    for head in (small, main, ghost):
        list_reset(after, before, head)
    where = np.zeros(keys, dtype=np.int8)
    freq = np.zeros(keys, dtype=np.int64)
    charge_of = np.zeros(keys, dtype=np.int64)
    ghost_size = np.zeros(keys, dtype=np.int64)
    small_count = main_count = 0
    small_bytes = main_bytes = ghost_bytes = 0
    used = hits = hit_bytes = evictions = 0
    for position in range(len(ids)):
        key = ids[position]
        charge = charged[position]
        if where[key] == _SMALL or where[key] == _MAIN:
            if freq[key] < 3:
                freq[key] += 1
            if position >= start:
                hits += 1
                hit_bytes += carried[position]
            continue
        if charge > capacity:
            continue
        while used + charge > capacity:
            while True:
                if small_count > 0 and (small_bytes >= small_target or main_count == 0):
                    victim = after[small]
                    list_unlink(after, before, victim)
                    small_count -= 1
                    size = charge_of[victim]
                    small_bytes -= size
                    if freq[victim] >= promote_after:
                        freq[victim] = 0
                        list_append(after, before, main, victim)
                        where[victim] = _MAIN
                        main_count += 1
                        main_bytes += size
                        continue
                    freq[victim] = 0
                    where[victim] = _GHOST
                    list_append(after, before, ghost, victim)
                    ghost_size[victim] = size
                    ghost_bytes += size
                    while ghost_bytes > ghost_limit:
                        oldest = after[ghost]
                        list_unlink(after, before, oldest)
                        where[oldest] = _NOWHERE
                        ghost_bytes -= ghost_size[oldest]
                    break
                victim = after[main]
                if freq[victim] > 0:
                    freq[victim] -= 1
                    list_move_to_end(after, before, main, victim)
                    continue
                list_unlink(after, before, victim)
                main_count -= 1
                main_bytes -= charge_of[victim]
                freq[victim] = 0
                where[victim] = _NOWHERE
                break
            used -= charge_of[victim]
            evictions = record_eviction(log, evictions, victim)
        freq[key] = 0
        charge_of[key] = charge
        used += charge
        if where[key] == _GHOST:
            list_unlink(after, before, key)
            ghost_bytes -= ghost_size[key]
            list_append(after, before, main, key)
            where[key] = _MAIN
            main_count += 1
            main_bytes += charge
        else:
            list_append(after, before, small, key)
            where[key] = _SMALL
            small_count += 1
            small_bytes += charge
    return hits, hit_bytes, evictions
