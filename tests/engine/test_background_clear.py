"""A hot swap's old slot is zeroed on the helper thread: ``attach`` returns once the new
revision serves, and the old slot is never used, handed out or freed before it is zero."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from engine_plugin import ResidentEngine
from engine_plugin.residency import SlotState
from tests.engine.conftest import Arch, make_ids, rel_err


@contextmanager
def helper_held(engine: ResidentEngine) -> Iterator[None]:
    """Keep the engine's helper thread busy until the block ends, so that a clear handed to
    it stays in flight (what a slow zeroing would look like)."""
    helper = engine._writer.helper
    assert helper is not None, "the engine has no helper thread"
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(60)

    held = helper.submit(hold)
    started.wait(10)
    try:
        yield
    finally:
        release.set()
        held.result(10)


def entry_of(engine: ResidentEngine, ref: str) -> tuple[int, SlotState]:
    """(slot, state) of the revision ``ref`` names, read without waiting for clears."""
    revision = engine.catalog.resolve(engine._parse(ref))
    entry = engine.slots.get(str(revision.digest))
    assert entry is not None, f"{ref} holds no slot"
    return entry.slot, entry.state


def test_hot_swap_returns_before_the_old_slot_is_zeroed(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source, num_slots=2, attach_threads=2)
    try:
        source.publish("t/h", llama.packs["t/qv-r8"])  # t/h@1
        engine.attach("t/h")
        old_slot, _ = entry_of(engine, "t/h@1")
        ids = make_ids(1, 5, seed=3)
        old_expected = llama.reference_logits("t/qv-r8", ids)
        new_expected = llama.reference_logits("t/all-r4", ids)
        with ThreadPoolExecutor(1) as pool:
            with helper_held(engine):
                source.publish("t/h", llama.packs["t/all-r4"])  # t/h@2
                assert engine.attach("t/h").number == 2  # returns, the zeroing still queued
                assert entry_of(engine, "t/h@1") == (old_slot, SlotState.CLEARING)
                assert not engine.pool.is_clear(old_slot)
                assert engine.slots.free_slots == 0  # not free before it is zero
                # The new revision serves meanwhile.
                fresh = engine.forward(ids, ["t/h"]).logits
                assert rel_err(fresh[0], new_expected[0]) <= 1e-4
                # A call naming the old revision waits for the zeroing, then loads it afresh.
                waiting = pool.submit(lambda: engine.forward(ids, ["t/h@1"]).logits)
                assert not waiting.done()
            assert rel_err(waiting.result(30)[0], old_expected[0]) <= 1e-4
        stats = engine.stats()  # waits for clears in flight
        assert stats["released"] == 1
        state = {r["ref"]: r for r in stats["resident"]}
        assert set(state) == {"t/h@1", "t/h@2"}
        assert all(r["state"] == "ready" for r in state.values())
    finally:
        engine.close()


def test_a_clearing_slot_is_never_handed_out(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source, num_slots=2, attach_threads=2)
    try:
        source.publish("t/h", llama.packs["t/qv-r8"])
        engine.attach("t/h")
        old_slot, _ = entry_of(engine, "t/h@1")
        ids = make_ids(2, 4, seed=5)
        with helper_held(engine):
            source.publish("t/h", llama.packs["t/all-r4"])
            engine.attach("t/h")
            # The only other slot holds t/h@2 (idle, so evictable): a third adapter takes
            # that one, never the slot still being zeroed.
            engine.attach("t/mlp-r16-rs")
            assert entry_of(engine, "t/mlp-r16-rs")[0] != old_slot
            assert entry_of(engine, "t/h@1") == (old_slot, SlotState.CLEARING)
        stats = engine.stats()
        assert engine.pool.is_clear(old_slot) and stats["free_slots"] == 1
        # t/h@2 was evicted; it comes back into the zeroed slot and serves exactly.
        logits = engine.forward(ids, ["t/h", "t/mlp-r16-rs"]).logits
        assert rel_err(logits[0], llama.reference_logits("t/all-r4", ids)[0]) <= 1e-4
        assert rel_err(logits[1], llama.reference_logits("t/mlp-r16-rs", ids)[1]) <= 1e-4
    finally:
        engine.close()


def test_detach_waits_for_a_clear_in_flight(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source, num_slots=2, attach_threads=2)
    try:
        source.publish("t/h", llama.packs["t/qv-r8"])
        engine.attach("t/h")
        with helper_held(engine):
            source.publish("t/h", llama.packs["t/all-r4"])
            engine.attach("t/h")
        detached = engine.detach("t/h")
        # Only the revision it served: the swapped-out one was freed before detach looked.
        assert [r.number for r in detached] == [2]
        assert all(engine.pool.is_clear(s) for s in range(engine.num_slots + 1))
        assert engine.stats()["free_slots"] == 2
    finally:
        engine.close()


def test_without_a_helper_the_old_slot_is_zeroed_before_attach_returns(
    make_engine: Callable[..., ResidentEngine], llama: Arch
) -> None:
    source = llama.source()
    engine = make_engine(source, num_slots=2, attach_threads=1)
    source.publish("t/h", llama.packs["t/qv-r8"])
    engine.attach("t/h")
    old_slot, _ = entry_of(engine, "t/h@1")
    source.publish("t/h", llama.packs["t/all-r4"])
    engine.attach("t/h")
    assert engine.slots.get(str(engine.catalog.resolve(engine._parse("t/h@1")).digest)) is None
    assert engine.pool.is_clear(old_slot) and engine.slots.free_slots == 1
    assert torch.equal(engine.pool.scales[old_slot], torch.zeros_like(engine.pool.scales[0]))


def test_a_clearing_slot_is_reported_gone_at_once(llama: Arch) -> None:
    """Residency reports drop the old revision when its slot starts clearing, so a flush right
    after the swap already tells the catalog what the engine serves."""
    source = llama.source()
    engine = llama.engine(source, num_slots=2, attach_threads=2)
    try:
        source.publish("t/h", llama.packs["t/qv-r8"])
        engine.attach("t/h")
        source.publish("t/h", llama.packs["t/all-r4"])
        new = engine.attach("t/h@2")  # resident already: the swap below loads nothing
        engine.flush_reports()
        with helper_held(engine):
            assert engine.attach("t/h") == new
            engine.flush_reports()
            assert set(source.reports[-1][1]) == {str(new.digest)}
    finally:
        engine.close()
