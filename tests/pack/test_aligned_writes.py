"""A pack plan cut into windows at multiples of a window size writes the same bytes as the plan,
parts stored as they are passed as views, transposed ones through the scratch."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from catalog.pack import TensorBytes, plan_from_peft_tensors
from catalog.pack.aligned_writes import aligned_windows
from catalog.pack.format import PackPlan, SwappedMatrices

PREFIX = "base_model.model.model.layers"
#: Odd shapes and ranks, so that parts and matrices straddle window boundaries anywhere.
SHAPES = {"self_attn.q_proj": (24, 24), "self_attn.k_proj": (24, 8), "mlp.down_proj": (40, 24)}


def _plan(rank: int, layers: int = 3, dtype: str = "BF16", seed: int = 0) -> PackPlan:
    rng = random.Random(seed)
    itemsize = {"BF16": 2, "F32": 4}[dtype]
    tensors = {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in SHAPES.items():
            for side, shape in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
                data = bytes(rng.randrange(1, 120) for _ in range(shape[0] * shape[1] * itemsize))
                key = f"{PREFIX}.{layer}.{name}.lora_{side}.weight"
                tensors[key] = TensorBytes(dtype, shape, memoryview(data))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["x"]}
    return plan_from_peft_tensors(config, tensors, "base")


@pytest.mark.parametrize(
    ("rank", "dtype", "window"),
    [(3, "BF16", 64), (5, "F32", 256), (16, "BF16", 4096), (1, "BF16", 8), (7, "BF16", 1 << 20)],
)
def test_windows_hold_the_plans_bytes_at_aligned_offsets(
    rank: int, dtype: str, window: int
) -> None:
    plan = _plan(rank, dtype=dtype)
    expected = plan.tobytes()
    scratch = memoryview(bytearray(window))
    written = bytearray(len(expected))
    offsets = []
    for offset, buffers in aligned_windows(plan, scratch, window):
        size = sum(b.nbytes for b in buffers)
        assert offset % window == 0 and offset == len(offsets) * window
        assert size == min(window, len(expected) - offset)
        written[offset : offset + size] = b"".join(bytes(b) for b in buffers)
        offsets.append(offset)
    assert bytes(written) == expected


def test_stored_parts_are_views_and_transposed_ones_go_through_scratch() -> None:
    plan = _plan(4)
    window = 128
    scratch = memoryview(bytearray(window))
    stored = [np.frombuffer(plan.header, np.uint8)] + [
        np.frombuffer(p, np.uint8) for p in plan.parts if not isinstance(p, SwappedMatrices)
    ]
    assert len(stored) > 1 and any(isinstance(p, SwappedMatrices) for p in plan.parts)
    kinds = set()
    for _, buffers in aligned_windows(plan, scratch, window):
        for buffer in buffers:
            array = np.frombuffer(buffer, np.uint8)
            in_scratch = np.shares_memory(array, np.frombuffer(scratch, np.uint8))
            # Anything not in scratch is a view of the caller's bytes, never a copy.
            assert in_scratch or any(np.shares_memory(array, s) for s in stored)
            kinds.add("scratch" if in_scratch else "stored")
    assert kinds == {"scratch", "stored"}


def test_pwritev_of_the_windows_writes_the_pack(tmp_path: Path) -> None:
    plan = _plan(16, layers=4)
    path = tmp_path / "pack"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, plan.nbytes)
        for offset, buffers in aligned_windows(plan, memoryview(bytearray(512)), 512):
            assert os.pwritev(fd, buffers, offset) == sum(b.nbytes for b in buffers)
    finally:
        os.close(fd)
    assert path.read_bytes() == plan.tobytes()


def test_a_scratch_smaller_than_the_window_is_refused() -> None:
    plan = _plan(2)
    with pytest.raises(ValueError, match="cannot hold a 64-byte window"):
        next(aligned_windows(plan, memoryview(bytearray(32)), 64))
    with pytest.raises(ValueError, match="window must be positive"):
        next(aligned_windows(plan, memoryview(bytearray(32)), 0))


def test_write_range_is_any_slice_of_the_transposed_bytes() -> None:
    rows, columns, count = 5, 3, 4
    source = bytes(range(2 * rows * columns * count))
    swapped = SwappedMatrices(source, 2, rows, columns)
    whole = bytes(swapped.materialize())
    for start in range(0, len(whole) + 1, 2):
        for stop in range(start, len(whole) + 1, 2):
            out = bytearray(stop - start)
            swapped.write_range(memoryview(out), start, stop)
            assert bytes(out) == whole[start:stop], (start, stop)
    with pytest.raises(ValueError, match="not whole elements"):
        swapped.write_range(memoryview(bytearray(1)), 1, 2)
    with pytest.raises(ValueError, match="not whole elements"):
        swapped.write_range(memoryview(bytearray(2)), len(whole), len(whole) + 2)
    with pytest.raises(ValueError, match="cannot hold"):
        swapped.write_range(memoryview(bytearray(4)), 0, 2)


def test_an_empty_transposed_part_is_a_zero_length_piece() -> None:
    """A ``lora_B`` part of no matrices writes nothing, whichever way the plan is written
    (``materialize`` raised TypeError on it: numpy cannot cast a zero-sized view)."""
    empty = SwappedMatrices(b"", 2, 5, 3)
    assert empty.nbytes == 0
    assert bytes(empty.materialize()) == b""
    assert empty.materialize().format == "B"
    empty.write_into(memoryview(bytearray(0)))
    empty.write_range(memoryview(bytearray(0)), 0, 0)
    whole = SwappedMatrices(bytes(range(2 * 5 * 3)), 2, 5, 3)
    plan = PackPlan(
        header=b"header",
        parts=(b"ab", empty, whole, empty, memoryview(b"cd")),
        nbytes=6 + 2 + whole.nbytes + 2,
    )
    expected = b"header" + b"ab" + bytes(whole.materialize()) + b"cd"
    assert plan.tobytes() == expected
    buffer = bytearray(plan.nbytes)
    plan.write_into(memoryview(buffer))
    assert bytes(buffer) == expected
    windows = aligned_windows(plan, memoryview(bytearray(8)), 8)
    assert b"".join(bytes(b) for _, buffers in windows for b in buffers) == expected
