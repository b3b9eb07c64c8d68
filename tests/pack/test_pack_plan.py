"""A pack laid out first and written into a caller's buffer (``PackPlan``, ``plan_peft_dir``):
the same bytes as ``import_peft_dir``, whatever the buffer, and refusals as import's."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from catalog.errors import InvalidPack
from catalog.pack import PEFT_WEIGHTS_FILE, import_peft_dir, plan_peft_dir, read_pack
from catalog.pack.format import SwappedMatrices
from tests.pack.conftest import AdapterCase


def test_a_plan_written_into_a_buffer_is_the_imported_pack(adapter: AdapterCase) -> None:
    expected = import_peft_dir(adapter.path, base_id="b")
    plan = plan_peft_dir(adapter.path, base_id="b")
    assert plan.nbytes == len(expected) and expected.startswith(plan.header)
    buffer = bytearray(b"\xa5" * plan.nbytes)  # no zeros to hide a part left unwritten
    plan.write_into(memoryview(buffer))
    assert bytes(buffer) == expected and plan.tobytes() == expected
    assert any(isinstance(part, SwappedMatrices) for part in plan.parts)
    read_pack(buffer)


def test_a_plan_written_into_a_file_mapping(adapter: AdapterCase, tmp_path: Path) -> None:
    plan = plan_peft_dir(adapter.path, base_id="b")
    path = tmp_path / "mapped.pack"
    with open(path, "w+b") as handle:
        handle.truncate(plan.nbytes)
        with mmap.mmap(handle.fileno(), plan.nbytes) as mapped, memoryview(mapped) as view:
            plan.write_into(view)
    assert path.read_bytes() == import_peft_dir(adapter.path, base_id="b")


def test_a_buffer_of_another_size_is_refused(adapter: AdapterCase) -> None:
    plan = plan_peft_dir(adapter.path, base_id="b")
    for size in (plan.nbytes - 1, plan.nbytes + 1):
        buffer = bytearray(size)
        with pytest.raises(ValueError, match="cannot fill"):
            plan.write_into(memoryview(buffer))
        assert buffer == bytearray(size)  # refused before a byte is written


def test_a_plan_outlives_its_weights_file_being_replaced(
    adapter_cases: dict[str, AdapterCase], tmp_path: Path
) -> None:
    # The parts are views of the adapter file's mapping: a plan made, then the file replaced
    # by a new one (as a trainer saving again does: a new inode) still writes what it read.
    case = adapter_cases["llama-f32-qv-r8"]
    copy = tmp_path / "adapter"
    copy.mkdir()
    for item in case.path.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    expected = import_peft_dir(copy, base_id="b")
    plan = plan_peft_dir(copy, base_id="b")
    weights = copy / PEFT_WEIGHTS_FILE
    replacement = tmp_path / "new.safetensors"
    replacement.write_bytes(b"\x00" * weights.stat().st_size)
    os.replace(replacement, weights)
    assert plan.tobytes() == expected


@pytest.mark.parametrize("size", [0, 7, 100])
def test_an_empty_or_truncated_weights_file_is_refused(
    adapter_cases: dict[str, AdapterCase], tmp_path: Path, size: int
) -> None:
    case = adapter_cases["llama-f32-qv-r8"]
    copy = tmp_path / "adapter"
    copy.mkdir()
    for item in case.path.iterdir():
        data = item.read_bytes()
        (copy / item.name).write_bytes(data[:size] if item.name == PEFT_WEIGHTS_FILE else data)
    with pytest.raises(InvalidPack, match=PEFT_WEIGHTS_FILE):
        plan_peft_dir(copy, base_id="b")


def test_swapped_matrices_transpose_each_matrix_bit_exactly() -> None:
    rng = np.random.default_rng(0)
    source = rng.integers(0, 2**16, size=(3, 5, 4), dtype=np.uint16)
    part = SwappedMatrices(source.tobytes(), 2, 5, 4)
    assert part.nbytes == source.nbytes
    out = bytearray(part.nbytes)
    part.write_into(memoryview(out))
    expected = np.ascontiguousarray(source.swapaxes(1, 2)).tobytes()
    assert bytes(out) == expected == bytes(part.materialize())
    with pytest.raises(InvalidPack, match="whole"):
        SwappedMatrices(source.tobytes()[:-2], 2, 5, 4)


def test_a_plan_in_aligned_windows_through_a_small_scratch_is_the_imported_pack(
    adapter: AdapterCase,
) -> None:
    from catalog.pack.aligned_writes import aligned_windows

    expected = import_peft_dir(adapter.path, base_id="b")
    plan = plan_peft_dir(adapter.path, base_id="b")
    # A 64-byte scratch: transposed parts go a window at a time, matrices split anywhere.
    windows = aligned_windows(plan, memoryview(bytearray(64)), 64)
    written = b"".join(bytes(b) for _, buffers in windows for b in buffers)
    assert written == expected


def test_an_empty_swapped_part_writes_nothing() -> None:
    part = SwappedMatrices(b"", 2, 5, 4)
    assert part.nbytes == 0
    part.write_range(memoryview(bytearray()), 0, 0)  # nothing to write, and no error
