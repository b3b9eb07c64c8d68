"""``catalog.pack.finite``: the bit test finds the first NaN or infinity in every float dtype,
wherever it lies (first and last element, either side of a step boundary), with or without
a reused scratch buffer, and passes finite data (the largest finite values included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalog.pack import finite
from catalog.pack.finite import first_non_finite

_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _raw(values: torch.Tensor) -> memoryview:
    return memoryview(values.contiguous().view(torch.uint8).numpy().tobytes())


@pytest.fixture
def small_steps(monkeypatch: pytest.MonkeyPatch) -> int:
    """Steps of 64 bytes, so a few hundred elements cross many step boundaries."""
    monkeypatch.setattr(finite, "_STEP_BYTES", 64)
    return 64


@pytest.mark.parametrize("dtype", sorted(_TORCH))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("use_scratch", [False, True])
def test_the_first_non_finite_element_is_found_across_step_boundaries(
    small_steps: int, dtype: str, bad: float, use_scratch: bool
) -> None:
    size = 301  # not a multiple of any step
    itemsize = torch.empty(0, dtype=_TORCH[dtype]).element_size()
    step = small_steps // itemsize
    scratch = np.empty(small_steps, dtype=np.uint8) if use_scratch else None
    finite_values = torch.linspace(-1000, 1000, size, dtype=torch.float64).to(_TORCH[dtype])
    finite_values[7] = torch.finfo(_TORCH[dtype]).max
    finite_values[8] = torch.finfo(_TORCH[dtype]).min
    assert first_non_finite(_raw(finite_values), dtype, scratch=scratch) is None
    for index in sorted({0, step - 1, step, step + 1, 2 * step, size - 1}):
        values = finite_values.clone()
        values[index] = bad
        if index + 3 < size:
            values[index + 3] = bad  # a later one does not hide the first
        assert first_non_finite(_raw(values), dtype, scratch=scratch) == index


def test_integer_and_empty_data_have_no_non_finite_element() -> None:
    assert first_non_finite(memoryview(b"\xff" * 64), "I32") is None
    assert first_non_finite(memoryview(b""), "BF16") is None


def test_a_scratch_smaller_than_a_step_is_not_written_past(small_steps: int) -> None:
    values = torch.ones(100, dtype=torch.float32)
    values[50] = float("nan")
    short = np.zeros(8, dtype=np.uint8)
    assert first_non_finite(_raw(values), "F32", scratch=short) == 50
    assert not short.any()  # too small, so a buffer of the call's own was used
