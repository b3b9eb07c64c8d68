"""Work shared with a helper thread: every piece once, failures in order, no waiting on a
helper that never runs; and a fetching attach that uses it fills slots exactly as staging does."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from catalog.errors import InvalidPack
from catalog.pack import convert_pack, read_pack
from engine_plugin import LocalPackSource
from engine_plugin.shared_work import first_axis_spans, run_shared
from engine_plugin.staging import stage_pack
from tests.engine.conftest import ADAPTER_SPECS, Arch, make_ids


def test_every_piece_runs_once_on_either_thread() -> None:
    done: list[int] = []
    threads: set[str] = set()

    def piece(i: int) -> None:
        done.append(i)
        threads.add(threading.current_thread().name)

    with ThreadPoolExecutor(1, "helper") as helper:
        run_shared([lambda i=i: piece(i) for i in range(200)], helper)
    assert sorted(done) == list(range(200))
    run_shared([lambda: piece(-1)], None)
    assert done[-1] == -1


def test_the_first_failing_piece_in_order_raises() -> None:
    def fail(i: int) -> None:
        raise ValueError(str(i))

    pieces = [lambda: None] * 5 + [lambda: fail(5), lambda: None, lambda: fail(7)]
    with ThreadPoolExecutor(1) as helper:
        for _ in range(20):
            with pytest.raises(ValueError, match=r"^5$"):
                run_shared(pieces, helper)


def test_a_helper_that_never_runs_is_not_waited_for() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(1) as helper:
        helper.submit(release.wait)  # the helper's one thread is busy: it never takes a piece
        done: list[int] = []
        run_shared([lambda i=i: done.append(i) for i in range(10)], helper)
        assert sorted(done) == list(range(10))
        release.set()


def test_first_axis_spans_cover_the_axis() -> None:
    assert first_axis_spans(10, 3, 7) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert first_axis_spans(3, 100, 7) == [(0, 1), (1, 2), (2, 3)]
    assert first_axis_spans(0, 1, 7) == []


@pytest.mark.parametrize("format_version", [1, 2])
@pytest.mark.parametrize("adapter", sorted(ADAPTER_SPECS))
def test_a_shared_fetching_attach_fills_slots_as_staging_does(
    llama: Arch, adapter: str, format_version: int
) -> None:
    """A fetching attach borrows ``lora_B`` (format 2: the pack's rank-major bytes as they are;
    format 1: a transposed view, transposed in the slot write, shared with a helper thread);
    the slots must hold exactly what the prefetcher's staging puts there, in either format."""
    source = LocalPackSource()
    source.publish(adapter, convert_pack(llama.packs[adapter], format_version))
    shared = llama.engine(source, attach_threads=2)
    staged = llama.engine(source, attach_threads=1)
    try:
        shared.attach(adapter)  # fetched: borrowed, shared write
        staged.prefetch([adapter])[0].result()  # staged apart, then one copy
        staged.attach(adapter)
        for name, module in shared.pool.modules.items():
            other = staged.pool.modules[name]
            assert torch.equal(module.lora_a, other.lora_a), name
            assert torch.equal(module.lora_bt, other.lora_bt), name
        # The fetching attach kept its borrowed staging: strided views of a format-1 pack,
        # contiguous views of a format-2 one (a bf16 pack on the fp32 base is copied).
        digest = str(shared.catalog.resolve(adapter).digest)
        borrowed = shared.host.peek(digest)
        assert borrowed is not None
        converted = "dtype" in ADAPTER_SPECS[adapter]
        contiguous = [m.lora_bt.is_contiguous() for m in borrowed.modules.values()]
        assert all(contiguous) == (converted or format_version == 2)
        assert any(contiguous) == (converted or format_version == 2)
        ids = make_ids(2, 5)
        assert torch.equal(
            shared.forward(ids, [adapter, None]).logits,
            staged.forward(ids, [adapter, None]).logits,
        )
    finally:
        shared.close()
        staged.close()


def test_shared_finite_checks_name_the_first_bad_module(llama: Arch) -> None:
    pack = bytearray(llama.packs["t/all-r4"])
    parsed = read_pack(bytes(pack))
    names = [spec.name for spec in parsed.manifest.modules]
    # A NaN in the last module's lora_B and an infinity in the second module's lora_A.
    for module, side, value in ((names[-1], "B", "nan"), (names[1], "A", "inf")):
        tensor = parsed.tensor(f"layers.{module}.lora_{side}")
        assert tensor.dtype == "F32"
        at = _offset(pack, bytes(tensor.data))
        torch.frombuffer(pack, dtype=torch.float32, offset=at, count=1)[0] = float(value)
    source = llama.source()
    revision = source.publish("t/bad", bytes(pack))
    with (
        ThreadPoolExecutor(1) as helper,
        pytest.raises(InvalidPack, match=f"lora_A of module '{names[1]}'"),
    ):
        stage_pack(
            revision,
            read_pack(memoryview(bytes(pack)).toreadonly()),
            dtype=torch.float32,
            borrow=True,
            borrow_b=True,
            helper=helper,
        )


def _offset(buffer: bytearray, needle: bytes) -> int:
    at = bytes(buffer).find(needle)
    assert at >= 0 and bytes(buffer).find(needle, at + 1) < 0
    return at
