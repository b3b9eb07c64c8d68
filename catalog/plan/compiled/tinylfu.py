"""W-TinyLFU compiled: the same decisions as ``catalog.cache.policies.WTinyLFU`` (default
parameters; defined in ``catalog.cache.tinylfu``) under the replay protocol, over integer key
ids (arguments as in ``fifo``).

The frequency table is the Python policy's exact ``FrequencyCounter`` (counts capped at 15,
halved every ``10 x max(1024, resident items)`` counted requests) as one array over key ids, so
there is no hash for the two to disagree on.
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

_NOWHERE, _WINDOW, _PROBATION, _PROTECTED = 0, 1, 2, 3
_CAP = 15
_SAMPLE_FACTOR = 10


@jit
def replay_wtinylfu(
    ids: IntArray, charged: IntArray, carried: IntArray, capacity: int, start: int, log: IntArray
) -> tuple[int, int, int]:
    """W-TinyLFU: 1% LRU window, frequency duel into a segmented LRU main (80% protected)."""
    keys = key_space(ids)
    window_target = max(1, int(capacity * 0.01))
    main_target = capacity - window_target
    protected_target = int(main_target * 0.8)
    after = np.empty(keys + 3, dtype=np.int64)
    before = np.empty(keys + 3, dtype=np.int64)
    heads = np.array([-1, keys, keys + 1, keys + 2], dtype=np.int64)  # by segment number
    window, probation, protected = keys, keys + 1, keys + 2
    for head in (window, probation, protected):
        list_reset(after, before, head)
    segment = np.zeros(keys, dtype=np.int8)
    counts = np.zeros(keys, dtype=np.int64)
    charge_of = np.zeros(keys, dtype=np.int64)
    displaced = np.empty(keys, dtype=np.int64)
    items = np.zeros(4, dtype=np.int64)  # per segment
    nbytes = np.zeros(4, dtype=np.int64)  # per segment
    additions = resident = 0
    used = hits = hit_bytes = evictions = 0
    for position in range(len(ids)):
        key = ids[position]
        charge = charged[position]
        hit = segment[key] != _NOWHERE
        if not hit and charge > capacity:
            continue  # admit() refuses before counting
        # Count the request (FrequencyCounter.increment with the policy's sample size).
        if counts[key] < _CAP:
            counts[key] += 1
        additions += 1
        if additions >= _SAMPLE_FACTOR * max(1024, resident):
            counts >>= 1
            additions //= 2
        if hit:
            if position >= start:
                hits += 1
                hit_bytes += carried[position]
            where = segment[key]
            if where != _PROBATION:  # window or protected
                list_move_to_end(after, before, heads[where], key)
            else:
                size = charge_of[key]
                list_unlink(after, before, key)
                items[_PROBATION] -= 1
                nbytes[_PROBATION] -= size
                list_append(after, before, protected, key)
                segment[key] = _PROTECTED
                items[_PROTECTED] += 1
                nbytes[_PROTECTED] += size
                while nbytes[_PROTECTED] > protected_target and items[_PROTECTED] > 1:
                    demoted = after[protected]
                    list_unlink(after, before, demoted)
                    moved = charge_of[demoted]
                    items[_PROTECTED] -= 1
                    nbytes[_PROTECTED] -= moved
                    list_append(after, before, probation, demoted)
                    segment[demoted] = _PROBATION
                    items[_PROBATION] += 1
                    nbytes[_PROBATION] += moved
            continue
        # Make room (EvictionPolicy.victims over WTinyLFU._choose_victims).
        while used + charge > capacity:
            if items[_WINDOW] > 0 and nbytes[_WINDOW] + charge > window_target:
                # The window's LRU item enters main, or is evicted, or evicts what it displaces.
                candidate = after[window]
                size = charge_of[candidate]
                list_unlink(after, before, candidate)
                segment[candidate] = _NOWHERE
                items[_WINDOW] -= 1
                nbytes[_WINDOW] -= size
                room = main_target - nbytes[_PROBATION] - nbytes[_PROTECTED]
                count = 0
                if room < size:
                    enough = False
                    freed = 0
                    for head in (probation, protected):
                        node = after[head]
                        while node != head:
                            displaced[count] = node
                            count += 1
                            freed += charge_of[node]
                            if room + freed >= size:
                                enough = True
                                break
                            node = after[node]
                        if enough:
                            break
                    rivals = 0
                    for index in range(count):
                        rivals += counts[displaced[index]]
                    if not enough or counts[candidate] <= rivals:
                        used -= size
                        resident -= 1
                        evictions = record_eviction(log, evictions, candidate)
                        continue
                    for index in range(count):
                        victim = displaced[index]
                        where = segment[victim]
                        list_unlink(after, before, victim)
                        items[where] -= 1
                        nbytes[where] -= charge_of[victim]
                        segment[victim] = _NOWHERE
                    for index in range(count):
                        victim = displaced[index]
                        used -= charge_of[victim]
                        resident -= 1
                        evictions = record_eviction(log, evictions, victim)
                list_append(after, before, probation, candidate)
                segment[candidate] = _PROBATION
                items[_PROBATION] += 1
                nbytes[_PROBATION] += size
                continue
            for where in (_PROBATION, _PROTECTED, _WINDOW):
                if items[where] > 0:
                    victim = after[heads[where]]
                    list_unlink(after, before, victim)
                    items[where] -= 1
                    nbytes[where] -= charge_of[victim]
                    segment[victim] = _NOWHERE
                    used -= charge_of[victim]
                    resident -= 1
                    evictions = record_eviction(log, evictions, victim)
                    break
        # Insert into the window; while main has room, the window's overflow moves there.
        charge_of[key] = charge
        used += charge
        resident += 1
        list_append(after, before, window, key)
        segment[key] = _WINDOW
        items[_WINDOW] += 1
        nbytes[_WINDOW] += charge
        while nbytes[_WINDOW] > window_target and items[_WINDOW] > 1:
            candidate = after[window]
            moved = charge_of[candidate]
            if nbytes[_PROBATION] + nbytes[_PROTECTED] + moved > main_target:
                break
            list_unlink(after, before, candidate)
            items[_WINDOW] -= 1
            nbytes[_WINDOW] -= moved
            list_append(after, before, probation, candidate)
            segment[candidate] = _PROBATION
            items[_PROBATION] += 1
            nbytes[_PROBATION] += moved
    return hits, hit_bytes, evictions
