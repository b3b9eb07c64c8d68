"""Slots over time: LRU eviction, zeroing before reuse, pins, busy slots, detach, hot swap."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from catalog.errors import NotFound, ResourceExhausted
from engine_plugin import LocalPackSource, ResidentEngine
from engine_plugin.layers import find_decoder_layers
from tests.engine.conftest import Arch, make_ids, rel_err


class PauseInLayer:
    """Blocks one thread's forward at the first decoder layer until released.

    Lets a test hold a request in flight (its leases taken) deterministically, with no sleeps.
    """

    def __init__(self, engine: ResidentEngine) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread: threading.Thread | None = None
        layer = find_decoder_layers(engine.model)[0]
        self._handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        if threading.current_thread() is self.thread and not self.release.is_set():
            self.entered.set()
            if not self.release.wait(timeout=60):
                raise TimeoutError("test never released the paused forward")

    @contextmanager
    def running(self, target: Callable[[], Any]) -> Iterator[Any]:
        """Run ``target`` on a thread, yield once it is paused inside the model, then let it
        finish; the yielded object's ``result()`` is the target's return value."""
        pool = ThreadPoolExecutor(max_workers=1)
        ready = threading.Event()

        def run() -> Any:
            self.thread = threading.current_thread()
            ready.set()
            return target()

        future = pool.submit(run)
        try:
            assert ready.wait(timeout=30)
            while not self.entered.wait(timeout=0.1):
                if future.done():
                    future.result()  # raises what the target raised
                    raise AssertionError("target finished without reaching the model")
            yield future
        finally:
            self.release.set()
            pool.shutdown(wait=True)
            self._handle.remove()


def resident(engine: ResidentEngine) -> dict[str, dict[str, Any]]:
    return {r["ref"]: r for r in engine.stats()["resident"]}


def test_lru_eviction_zeroes_before_reuse(make_engine: Callable[..., ResidentEngine]) -> None:
    engine = make_engine(num_slots=2)
    ids = make_ids(1, 3)
    engine.forward(ids, ["t/all-r4"])  # slot 0
    engine.forward(ids, ["t/mlp-r16-rs"])  # slot 1
    engine.forward(ids, ["t/all-r4"])  # touch: t/mlp-r16-rs is now least recently used
    assert engine.stats()["evictions"] == 0
    mlp_slot = resident(engine)["t/mlp-r16-rs@1"]["slot"]

    engine.forward(ids, ["t/ko-r2-bf16"])  # needs a slot: evicts t/mlp-r16-rs
    stats = engine.stats()
    assert set(resident(engine)) == {"t/all-r4@1", "t/ko-r2-bf16@1"}
    assert stats["evictions"] == 1
    assert resident(engine)["t/ko-r2-bf16@1"]["slot"] == mlp_slot
    # The rank-16 tenant is gone: beyond rank 2, and in modules t/ko-r2-bf16 does not adapt,
    # the reused slot holds zeros only.
    for name, slots in engine.pool.modules.items():
        rank = slots.ranks[mlp_slot]
        assert not slots.lora_a[:, mlp_slot, rank:].any(), name
        assert not slots.lora_bt[:, mlp_slot, rank:].any(), name
        if name not in ("self_attn.k_proj", "self_attn.o_proj"):
            assert rank == 0 and not slots.lora_a[:, mlp_slot].any(), name


def test_evicted_adapter_comes_back_exact(llama: Arch) -> None:
    engine = llama.engine(num_slots=1)
    ids = make_ids(1, 4, seed=3)
    for adapter in ["t/qv-r8", "t/mlp-r16-rs", "t/qv-r8"]:
        logits = engine.forward(ids, [adapter]).logits
        assert rel_err(logits[0], llama.reference_logits(adapter, ids)[0]) <= 1e-4
    assert engine.stats()["evictions"] == 2
    assert engine.stats()["host"]["hits"] >= 1  # the second load came from host memory


def test_pins_are_never_evicted(make_engine: Callable[..., ResidentEngine]) -> None:
    engine = make_engine(num_slots=2)
    ids = make_ids(1, 3)
    engine.pin("t/qv-r8")
    for adapter in ["t/all-r4", "t/mlp-r16-rs", "t/ko-r2-bf16"]:
        engine.forward(ids, [adapter])
        assert "t/qv-r8@1" in resident(engine)
    assert resident(engine)["t/qv-r8@1"]["pinned"]

    engine.pin("t/ko-r2-bf16")
    with pytest.raises(ResourceExhausted, match="busy or pinned"):
        engine.forward(ids, ["t/all-r4"])
    # the refusal left nothing half-done
    assert set(resident(engine)) == {"t/qv-r8@1", "t/ko-r2-bf16@1"}

    engine.unpin("t/qv-r8")
    engine.forward(ids, ["t/all-r4"])
    assert set(resident(engine)) == {"t/ko-r2-bf16@1", "t/all-r4@1"}
    with pytest.raises(NotFound):
        engine.unpin("t/qv-r8")


def test_running_batch_adapters_are_never_evicted(
    make_engine: Callable[..., ResidentEngine],
) -> None:
    engine = make_engine(num_slots=1)
    ids = make_ids(1, 3)
    pause = PauseInLayer(engine)
    with pause.running(lambda: engine.forward(ids, ["t/qv-r8"])) as running:
        assert resident(engine)["t/qv-r8@1"]["in_flight"] == 1
        with pytest.raises(ResourceExhausted, match=r"t/qv-r8@1"):
            engine.forward(ids, ["t/all-r4"])
        with pytest.raises(ResourceExhausted):
            engine.attach("t/all-r4")
    running.result()
    assert resident(engine)["t/qv-r8@1"]["in_flight"] == 0
    engine.forward(ids, ["t/all-r4"])  # now the idle slot can be taken


def test_waits_for_a_busy_slot_when_asked(make_engine: Callable[..., ResidentEngine]) -> None:
    engine = make_engine(num_slots=1, slot_wait_s=60)
    ids = make_ids(1, 3)
    pause = PauseInLayer(engine)
    with ThreadPoolExecutor(max_workers=1) as waiter:
        with pause.running(lambda: engine.forward(ids, ["t/qv-r8"])) as first:
            second = waiter.submit(engine.forward, ids, ["t/all-r4"])
            while engine.stats()["slot_waits"] == 0:  # poll state, not time
                assert not second.done(), second.exception()
                threading.Event().wait(0.01)
            assert not second.done()
        first.result()
        logits = second.result(timeout=60).logits
    assert set(resident(engine)) == {"t/all-r4@1"}
    assert logits.shape[0] == 1


def test_batch_with_more_adapters_than_slots_is_refused(
    make_engine: Callable[..., ResidentEngine],
) -> None:
    engine = make_engine(num_slots=2)
    with pytest.raises(ResourceExhausted, match="names 3 adapters"):
        engine.forward(make_ids(3, 2), ["t/qv-r8", "t/all-r4", "t/mlp-r16-rs"])
    assert engine.stats()["resident"] == []


def test_detach_zeroes_and_frees(make_engine: Callable[..., ResidentEngine]) -> None:
    engine = make_engine(num_slots=2)
    engine.attach("t/all-r4")
    slot = resident(engine)["t/all-r4@1"]["slot"]
    assert not engine.pool.is_clear(slot)
    detached = engine.detach("t/all-r4")
    assert [str(r.adapter) for r in detached] == ["t/all-r4"]
    assert engine.pool.is_clear(slot)
    assert engine.stats()["resident"] == [] and engine.stats()["free_slots"] == 2
    assert "t/all-r4" not in engine.stats()["bindings"]
    with pytest.raises(NotFound):
        engine.detach("t/all-r4")


def test_detach_one_revision_keeps_others(llama: Arch) -> None:
    source = llama.source()
    source.publish("t/qv-r8", llama.packs["t/all-r4"])  # revision 2 of t/qv-r8
    engine = llama.engine(source, num_slots=3)
    ids = make_ids(1, 3)
    engine.forward(ids, ["t/qv-r8@1"])
    engine.forward(ids, ["t/qv-r8@2"])
    engine.detach("t/qv-r8@1")
    assert set(resident(engine)) == {"t/qv-r8@2"}


def test_hot_swap_in_flight_finishes_on_old_revision(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source, num_slots=2)
    engine.attach("t/qv-r8@latest")
    ids = make_ids(1, 5, seed=11)
    old_expected = llama.reference_logits("t/qv-r8", ids)
    new_expected = llama.reference_logits("t/all-r4", ids)

    pause = PauseInLayer(engine)
    with pause.running(lambda: engine.forward(ids, ["t/qv-r8"])) as in_flight:
        # A trainer publishes revision 2; the engine swaps while revision 1 is in use.
        source.publish("t/qv-r8", llama.packs["t/all-r4"])
        swapped = engine.attach("t/qv-r8")
        assert swapped.number == 2
        state = resident(engine)
        assert state["t/qv-r8@1"]["retired"] and state["t/qv-r8@1"]["in_flight"] == 1
        old_slot = state["t/qv-r8@1"]["slot"]
        # New requests get the new revision while the old one is still running.
        fresh = engine.forward(ids, ["t/qv-r8"]).logits
        assert rel_err(fresh[0], new_expected[0]) <= 1e-4
    assert rel_err(in_flight.result().logits[0], old_expected[0]) <= 1e-4
    # The old slot was released (and zeroed) when its last request finished.
    assert set(resident(engine)) == {"t/qv-r8@2"}
    assert engine.pool.is_clear(old_slot)


def test_hot_swap_during_generate(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source, num_slots=2)
    engine.attach("t/qv-r8")
    ids = make_ids(2, 4, seed=12)
    reference = llama.engine(llama.source(), num_slots=2)
    expected = reference.generate(ids, ["t/qv-r8", None], max_new_tokens=5)

    pause = PauseInLayer(engine)
    with pause.running(
        lambda: engine.generate(ids, ["t/qv-r8", None], max_new_tokens=5)
    ) as running:
        source.publish("t/qv-r8", llama.packs["t/mlp-r16-rs"])
        engine.attach("t/qv-r8")
    assert torch.equal(running.result(), expected)
    assert set(resident(engine)) == {"t/qv-r8@2"}


def test_hot_swap_under_concurrent_threads(llama: Arch) -> None:
    """Readers hammer ``t/h`` while a writer swaps it between revisions; every result is
    exactly one revision's output (never a mix, never a stale or zeroed slot)."""
    source = LocalPackSource()
    revisions = ["t/qv-r8", "t/all-r4", "t/mlp-r16-rs", "t/ko-r2-bf16"]
    # two readers' leases + the current revision + the one being attached
    engine = llama.engine(source, num_slots=4)
    ids = make_ids(2, 4, seed=13)
    expected = [llama.reference_logits(name, ids)[0] for name in revisions]
    base_row = llama.reference_logits(None, ids)[1]
    source.publish("t/h", llama.packs[revisions[0]])
    engine.attach("t/h")
    stop = threading.Event()
    errors: list[str] = []
    seen: set[int] = set()

    def reader() -> int:
        count = 0
        while not stop.is_set() or count < 3:
            logits = engine.forward(ids, ["t/h", None]).logits
            errs = [rel_err(logits[0], e) for e in expected]
            best = min(range(len(errs)), key=errs.__getitem__)
            if errs[best] > 1e-4:
                errors.append(f"row matches no revision: {errs}")
            if rel_err(logits[1], base_row) > 1e-5:
                errors.append("base row disturbed")
            seen.add(best)
            count += 1
        return count

    with ThreadPoolExecutor(max_workers=3) as pool:
        readers = [pool.submit(reader) for _ in range(2)]
        for name in revisions[1:]:
            source.publish("t/h", llama.packs[name])
            engine.attach("t/h")
            engine.forward(ids, ["t/h", None])
        stop.set()
        counts = [r.result(timeout=120) for r in readers]
    assert not errors, errors[:3]
    assert sum(counts) >= 6 and len(seen) >= 2
    state = resident(engine)
    assert set(state) == {"t/h@4"}
    assert engine.stats()["released"] >= 3


def test_pin_follows_name_across_hot_swap(llama: Arch) -> None:
    source = llama.source()
    engine = llama.engine(source, num_slots=2)
    engine.pin("t/qv-r8")
    source.publish("t/qv-r8", llama.packs["t/all-r4"])
    engine.attach("t/qv-r8")
    state = resident(engine)
    assert set(state) == {"t/qv-r8@2"} and state["t/qv-r8@2"]["pinned"]


def test_alias_binding_is_served_without_asking_the_catalog(llama: Arch) -> None:
    source = llama.source()
    source.set_alias("t/qv-r8", "serving", 1)
    engine = llama.engine(source, num_slots=2)
    engine.attach("t/qv-r8@serving")
    source.publish("t/qv-r8", llama.packs["t/all-r4"], aliases=("serving",))
    ids = make_ids(1, 3)
    # Still revision 1: the catalog moved, the engine has not been told to swap.
    for ref in ["t/qv-r8@serving", "t/qv-r8@1"]:
        logits = engine.forward(ids, [ref]).logits
        assert rel_err(logits[0], llama.reference_logits("t/qv-r8", ids)[0]) <= 1e-4, ref
    # A bare name means `latest`, which attaching `@serving` did not bind: its first use
    # resolves it now (revision 2).
    logits = engine.forward(ids, ["t/qv-r8"]).logits
    assert rel_err(logits[0], llama.reference_logits("t/all-r4", ids)[0]) <= 1e-4
    engine.attach("t/qv-r8@serving")
    logits = engine.forward(ids, ["t/qv-r8@serving"]).logits
    assert rel_err(logits[0], llama.reference_logits("t/all-r4", ids)[0]) <= 1e-4
    stats = engine.stats()
    assert stats["bindings"] == {"t/qv-r8": "t/qv-r8@2", "t/qv-r8@serving": "t/qv-r8@2"}


def test_same_bytes_under_two_names_share_a_slot(llama: Arch) -> None:
    source = llama.source()
    source.publish("u/twin", llama.packs["t/qv-r8"])
    engine = llama.engine(source, num_slots=2)
    engine.attach("t/qv-r8")
    engine.attach("u/twin")
    assert engine.stats()["free_slots"] == 1  # one digest, one slot
    engine.detach("u/twin")
    misses = engine.stats()["misses"]
    ids = make_ids(1, 3)
    logits = engine.forward(ids, ["t/qv-r8"]).logits
    assert engine.stats()["misses"] == misses  # t/qv-r8 kept its slot
    assert rel_err(logits[0], llama.reference_logits("t/qv-r8", ids)[0]) <= 1e-4


def test_bindings_of_evicted_revisions_are_pruned_past_the_limit(
    make_engine: Callable[..., ResidentEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine_plugin import bindings

    monkeypatch.setattr(bindings, "BINDINGS_LIMIT", 2)
    engine = make_engine(num_slots=1)
    ids = make_ids(1, 2)
    for name in ["t/qv-r8", "t/all-r4", "t/mlp-r16-rs"]:
        engine.forward(ids, [name])
    # each new binding found the table full and dropped those whose revision left the slots
    assert set(engine.stats()["bindings"]) <= {"t/all-r4", "t/mlp-r16-rs"}
    assert "t/mlp-r16-rs" in engine.stats()["bindings"]


def test_a_new_catalog_serves_resolves_and_fetches_alike(llama: Arch) -> None:
    """Setting ``engine.catalog`` moves the fetches with the resolves: an adapter only the new
    source holds attaches, with its own weights."""
    from engine_plugin import LocalPackSource

    first = LocalPackSource()
    first.publish("t/qv-r8", llama.packs["t/qv-r8"])
    engine = llama.engine(first, num_slots=2)
    engine.attach("t/qv-r8")
    other = LocalPackSource()  # holds bytes the first source does not
    other.publish("u/moved", llama.packs["t/all-r4"])
    engine.catalog = other
    engine.attach("u/moved")
    ids = make_ids(1, 4, seed=48)
    logits = engine.forward(ids, ["u/moved"]).logits
    assert rel_err(logits[0], llama.reference_logits("t/all-r4", ids)[0]) <= 1e-4
