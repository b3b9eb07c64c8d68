"""What the compiled replays are built from, over integer key ids in ``[0, key_space)``.

* Intrusive doubly linked lists (the compiled ``OrderedDict``): two arrays ``after`` and
  ``before`` indexed by key id, plus one sentinel node per list at ``key_space + list``. A key is
  in at most one list of a policy at a time, so one pair of arrays serves all of its lists.
* A binary min-heap of ``(priority, sequence, key)`` in three parallel arrays, ordered as Python
  orders the tuples in ``heapq``: by priority, then by sequence. Sequences are unique, so the
  order of pops depends only on which entries are in the heap, never on its layout; the
  compiled policies keep exactly the entries the Python ones keep (stale ones included) and so
  pop in exactly the same order.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from catalog.plan.compiled._jit import jit

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@jit
def key_space(ids: IntArray) -> int:
    """One more than the largest id (0 for no requests): the size of per-key arrays."""
    return int(ids.max()) + 1 if len(ids) else 0


@jit
def record_eviction(log: IntArray, count: int, victim: int) -> int:
    """Write ``victim`` at ``log[count]`` when logging (``log`` not empty); the new count."""
    if len(log):
        log[count] = victim
    return count + 1


# --- linked lists ---------------------------------------------------------------------------


@jit
def list_reset(after: IntArray, before: IntArray, head: int) -> None:
    """Make the list whose sentinel is ``head`` empty."""
    after[head] = head
    before[head] = head


@jit
def list_append(after: IntArray, before: IntArray, head: int, node: int) -> None:
    """Put ``node`` at the end (most recent) of the list ``head``."""
    last = before[head]
    after[last] = node
    before[node] = last
    after[node] = head
    before[head] = node


@jit
def list_unlink(after: IntArray, before: IntArray, node: int) -> None:
    """Take ``node`` out of whatever list holds it."""
    previous = before[node]
    following = after[node]
    after[previous] = following
    before[following] = previous


@jit
def list_move_to_end(after: IntArray, before: IntArray, head: int, node: int) -> None:
    """``OrderedDict.move_to_end``: ``node`` becomes the most recent of the list ``head``."""
    list_unlink(after, before, node)
    list_append(after, before, head, node)


# --- heap -----------------------------------------------------------------------------------


@jit
def heap_arrays(room: int) -> tuple[FloatArray, IntArray, IntArray]:
    """Empty ``(priority, sequence, key)`` arrays for a heap of at most ``room`` entries."""
    return (
        np.empty(room, dtype=np.float64),
        np.empty(room, dtype=np.int64),
        np.empty(room, dtype=np.int64),
    )


@jit
def _before(priority: FloatArray, sequence: IntArray, i: int, j: int) -> bool:
    """Whether entry ``i`` sorts before entry ``j`` (Python's tuple order)."""
    if priority[i] != priority[j]:
        return bool(priority[i] < priority[j])
    return bool(sequence[i] < sequence[j])


@jit
def _swap(priority: FloatArray, sequence: IntArray, keys: IntArray, i: int, j: int) -> None:
    priority[i], priority[j] = priority[j], priority[i]
    sequence[i], sequence[j] = sequence[j], sequence[i]
    keys[i], keys[j] = keys[j], keys[i]


@jit
def _sift_up(priority: FloatArray, sequence: IntArray, keys: IntArray, position: int) -> None:
    while position > 0:
        parent = (position - 1) >> 1
        if not _before(priority, sequence, position, parent):
            break
        _swap(priority, sequence, keys, position, parent)
        position = parent


@jit
def _sift_down(
    priority: FloatArray, sequence: IntArray, keys: IntArray, position: int, size: int
) -> None:
    while True:
        child = 2 * position + 1
        if child >= size:
            break
        if child + 1 < size and _before(priority, sequence, child + 1, child):
            child += 1
        if not _before(priority, sequence, child, position):
            break
        _swap(priority, sequence, keys, position, child)
        position = child


@jit
def heap_push(
    priority: FloatArray,
    sequence: IntArray,
    keys: IntArray,
    size: int,
    entry_priority: float,
    entry_sequence: int,
    key: int,
) -> int:
    """``heapq.heappush`` of ``(entry_priority, entry_sequence, key)``; the new size. The
    arrays must have room (callers size them by the pushes they can make)."""
    priority[size] = entry_priority
    sequence[size] = entry_sequence
    keys[size] = key
    _sift_up(priority, sequence, keys, size)
    return size + 1


@jit
def heap_pop(
    priority: FloatArray, sequence: IntArray, keys: IntArray, size: int
) -> tuple[float, int, int, int]:
    """``heapq.heappop`` of a non-empty heap: ``(priority, sequence, key, new size)``."""
    top_priority, top_sequence, top_key = priority[0], sequence[0], keys[0]
    size -= 1
    if size > 0:
        priority[0], sequence[0], keys[0] = priority[size], sequence[size], keys[size]
        _sift_down(priority, sequence, keys, 0, size)
    return top_priority, top_sequence, top_key, size


@jit
def heapify(priority: FloatArray, sequence: IntArray, keys: IntArray, size: int) -> None:
    """``heapq.heapify`` of the first ``size`` entries."""
    for position in range(size // 2 - 1, -1, -1):
        _sift_down(priority, sequence, keys, position, size)


@jit
def heap_drop_stale(
    priority: FloatArray,
    sequence: IntArray,
    keys: IntArray,
    size: int,
    current: FloatArray,
    ranked: npt.NDArray[np.bool_],
) -> int:
    """Keep the entries whose priority is their key's ``current`` one (``ranked`` keys only),
    then heapify: the Python policies' compaction. The new size."""
    kept = 0
    for position in range(size):
        key = keys[position]
        if ranked[key] and current[key] == priority[position]:
            priority[kept], sequence[kept], keys[kept] = (
                priority[position],
                sequence[position],
                keys[position],
            )
            kept += 1
    heapify(priority, sequence, keys, kept)
    return kept
