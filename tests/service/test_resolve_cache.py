"""The Resolve answer cache: never stale after a write, never caching errors."""

from __future__ import annotations

import pytest

from catalog.errors import NotFound
from catalog.service.resolve_cache import GenerationCache


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


def test_hits_until_the_generation_moves() -> None:
    generation = Counter()
    cache: GenerationCache[str] = GenerationCache(generation)
    calls = []

    def compute() -> tuple[int, str]:
        calls.append(1)
        return generation.value, f"answer@{generation.value}"

    assert cache.get("t/a", compute) == "answer@0"
    assert cache.get("t/a", compute) == "answer@0"
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    generation.value = 1
    assert cache.get("t/a", compute) == "answer@1"
    assert len(calls) == 2


def test_an_answer_is_kept_under_the_generation_it_was_read_at() -> None:
    generation = Counter()
    cache: GenerationCache[str] = GenerationCache(generation)

    def read_at_one() -> tuple[int, str]:
        return 1, "state of generation 1"  # a write committed before the lookup's snapshot

    assert cache.get("t/a", read_at_one) == "state of generation 1"
    # not served at generation 0 (the request's), only once generation 1 is current
    assert cache.get("t/a", lambda: (0, "fresh")) == "fresh"
    generation.value = 1
    assert cache.get("t/a", lambda: (1, "recomputed")) == "recomputed"
    assert cache.get("t/a", lambda: (1, "not called")) == "recomputed"


def test_an_answer_read_across_a_write_is_not_stored() -> None:
    cache: GenerationCache[str] = GenerationCache(Counter())
    assert cache.get("t/a", lambda: (None, "maybe stale")) == "maybe stale"
    assert len(cache) == 0
    assert cache.get("t/a", lambda: (0, "fresh")) == "fresh"


def test_errors_are_not_cached_and_the_size_is_bounded() -> None:
    cache: GenerationCache[int] = GenerationCache(lambda: 0, entries=2)

    def missing() -> tuple[int, int]:
        raise NotFound("t/x not found")

    with pytest.raises(NotFound):
        cache.get("t/x", missing)
    assert len(cache) == 0
    for i in range(5):
        cache.get(f"t/{i}", lambda i=i: (0, i))  # type: ignore[misc]
        assert len(cache) <= 2
    with pytest.raises(ValueError):
        GenerationCache(lambda: 0, entries=0)


def test_resolve_over_grpc_follows_every_write(client, packs):  # type: ignore[no-untyped-def]
    one = client.push("acme/rc", packs["qv-r4"], aliases=("serving",)).revision
    for _ in range(3):
        assert client.resolve("acme/rc@serving").number == one.number
    two = client.push("acme/rc", packs["all-r8"]).revision
    assert client.resolve("acme/rc").number == two.number  # latest moved
    assert client.resolve("acme/rc@serving").number == one.number
    client.set_alias("acme/rc", "serving", two.number)
    assert client.resolve("acme/rc@serving").number == two.number
    client.set_alias("acme/rc", "serving", 0)
    client.delete("acme/rc@1")
    with pytest.raises(NotFound):
        client.resolve("acme/rc@1")
    assert client.resolve("acme/rc").aliases == ("latest",)


def test_the_default_snapshot_read_gives_no_generation_when_a_write_races() -> None:
    from catalog.index.base import RevisionIndex
    from catalog.index.memory_index import MemoryIndex
    from catalog.model import Ref
    from tests.index.writer import Writer, name

    index = MemoryIndex()
    writer = Writer(index)
    writer.push(name("acme/r"))

    def racing_resolve(ref: Ref):  # type: ignore[no-untyped-def]
        answer = MemoryIndex.resolve(index, ref)
        writer.push(name("acme/r"))  # commits between the lookup and the second read
        return answer

    index.resolve = racing_resolve  # type: ignore[method-assign]
    generation, revision = RevisionIndex.resolve_at_generation(index, Ref.parse("acme/r"))
    assert generation is None and revision.number == 1
