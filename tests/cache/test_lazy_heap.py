"""LazyMinHeap: the ranking under GDSF and lrfu-size (catalog.cache.lazy_heap)."""

from __future__ import annotations

import random

import pytest

from catalog.cache.lazy_heap import LazyMinHeap


def drain(heap: LazyMinHeap) -> list[tuple[float, str]]:
    out = []
    while (lowest := heap.pop_lowest()) is not None:
        out.append(lowest)
    return out


def test_lowest_first_ties_in_push_order_and_moved_keys_pop_once() -> None:
    heap = LazyMinHeap()
    for key, priority in (("a", 2.0), ("b", 1.0), ("c", 2.0), ("d", 3.0)):
        heap.push(key, priority)
    heap.push("b", 5.0)  # moved: its entry at 1.0 is stale now
    heap.remove("d")
    assert heap.keys() == ["a", "b", "c"]
    assert drain(heap) == [(2.0, "a"), (2.0, "c"), (5.0, "b")]
    assert heap.pop_lowest() is None and heap.keys() == []


def test_take_and_put_back_leave_the_order_as_it_was() -> None:
    heap = LazyMinHeap()
    for index in range(10):
        heap.push(f"k{index}", float(index % 3))
    heap.push("k0", 9.0)
    taken = [heap.take_lowest() for _ in range(4)]
    assert [entry[2] for entry in taken] == ["k3", "k6", "k9", "k1"]
    assert "k3" in heap.priorities  # taken, not removed
    heap.put_back(taken)
    assert [key for _, key in drain(heap)][:4] == ["k3", "k6", "k9", "k1"]
    with pytest.raises(IndexError):
        heap.take_lowest()


def test_matches_a_reference_and_compacts_on_push() -> None:
    rng = random.Random(5)
    heap, reference = LazyMinHeap(), {}
    for _ in range(50_000):
        key = f"k{rng.randrange(500)}"
        if key in reference and rng.random() < 0.2:
            heap.remove(key)
            del reference[key]
        else:
            reference[key] = float(rng.randrange(1000))
            heap.push(key, reference[key])
            assert len(heap._heap) <= 2 * len(reference) + 1024
    assert sorted(drain(heap)) == sorted((priority, key) for key, priority in reference.items())
    heap.push("x", 1.0)
    heap.clear()
    assert heap.pop_lowest() is None
