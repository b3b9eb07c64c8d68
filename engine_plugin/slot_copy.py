"""Slot writes and zeroing on a GPU in one launch each, whatever the adapter's layout.

A slot of a module is a strided view of the pool (``[L, S + 1, R, in]`` cut to one slot and
the first ``r`` ranks: ``L`` runs of ``r * in`` elements). Copying a staged adapter into it
with ``copy_`` costs, per stacked tensor, a temporary, a host-to-device copy into it and a copy
kernel, plus the host work of each call: ~280 us for 14 tensors on an H200, most of a rank-1
attach (390 us against 116 us for the bare copies). Zeroing a slot on detach was ~130 us more.

Here an attach is one host-to-device copy of the adapter's single pinned buffer (staged that
way, see ``staging``) into a device staging buffer, then one kernel that scatters every tensor
into its slot views, driven by a small table of runs (``Runs``) cached on the device per slot
and adapter layout. Zeroing is one kernel over the same kind of table. Both move 2-byte words,
so any of the engine's dtypes (and the fp32 scales) go through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine_plugin import lora_kernels

#: Words (2 bytes) each program moves.
_BLOCK = 4096
#: Bound on cached run tables (one per slot and layout; layouts are few).
_TABLES_LIMIT = 4096

tl = lora_kernels.tl
triton = lora_kernels.triton


@dataclass(frozen=True)
class Runs:
    """A strided view as ``runs`` runs of ``length`` contiguous 2-byte words, ``stride`` words
    apart, starting at byte address ``address``."""

    address: int
    runs: int
    length: int
    stride: int

    @property
    def words(self) -> int:
        return self.runs * self.length


def as_runs(view: torch.Tensor) -> Runs | None:
    """``view`` as evenly spaced contiguous runs, or None when it is not one (or not made of
    whole 2-byte words)."""
    size = view.element_size()
    if size % 2 or view.numel() == 0:
        return None
    shape, strides = list(view.shape), list(view.stride())
    # Merge the contiguous tail into one run.
    length = 1
    while shape and (shape[-1] == 1 or strides[-1] == length):
        length *= shape.pop()
        strides.pop()
    # What is left must be one evenly strided axis (after merging axes that chain).
    while len(shape) > 1 and strides[-2] == strides[-1] * shape[-1]:
        last, stride = shape.pop(), strides.pop()
        shape[-1] *= last
        strides[-1] = stride
    words = size // 2
    if not shape:
        return Runs(view.data_ptr(), 1, length * words, length * words)
    if len(shape) > 1:
        return None
    return Runs(view.data_ptr(), shape[0], length * words, strides[0] * words)


def available(device: torch.device) -> bool:
    return lora_kernels.kernel_available(device)


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _scatter_kernel(src_ptr, table_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def,name-defined]
        """Program ``(b, t)`` copies block ``b`` of entry ``t``: words from ``src`` at the
        entry's offset to its runs. Table rows: src offset, dst address, runs, length,
        stride (words; the address in bytes)."""
        block = tl.program_id(0)
        entry = table_ptr + tl.program_id(1) * 5
        runs = tl.load(entry + 2)
        length = tl.load(entry + 3)
        offs = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < runs * length
        if block * BLOCK < runs * length:
            src = tl.load(entry + 0)
            dst = tl.load(entry + 1).to(tl.pointer_type(tl.int16))
            stride = tl.load(entry + 4)
            words = tl.load(src_ptr + src + offs, mask=mask)
            tl.store(dst + (offs // length) * stride + offs % length, words, mask=mask)

    @triton.jit  # type: ignore[untyped-decorator]
    def _zero_kernel(table_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def,name-defined]
        block = tl.program_id(0)
        entry = table_ptr + tl.program_id(1) * 5
        runs = tl.load(entry + 2)
        length = tl.load(entry + 3)
        offs = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < runs * length
        if block * BLOCK < runs * length:
            dst = tl.load(entry + 1).to(tl.pointer_type(tl.int16))
            stride = tl.load(entry + 4)
            zeros = tl.zeros((BLOCK,), dtype=tl.int16)
            tl.store(dst + (offs // length) * stride + offs % length, zeros, mask=mask)


class SlotCopier:
    """Scatter and zero kernels for one pool's slots, with their run tables cached.

    Runs on the current stream (the engine's copy stream on CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging = torch.empty(0, dtype=torch.int16, device=device)
        self._tables: dict[object, tuple[torch.Tensor, int]] = {}

    def _table(self, key: object, rows: Sequence[tuple[int, Runs]]) -> tuple[torch.Tensor, int]:
        cached = self._tables.get(key)
        if cached is None:
            values = [[src, r.address, r.runs, r.length, r.stride] for src, r in rows]
            table = torch.tensor(values, dtype=torch.int64).to(self.device)
            cached = (table, max(r.words for _, r in rows))
            if len(self._tables) >= _TABLES_LIMIT:
                self._tables.clear()
            self._tables[key] = cached
        return cached

    def write(self, key: object, flat: torch.Tensor, targets: Sequence[tuple[int, Runs]]) -> None:
        """Copy ``flat`` (pinned host words) to the device, then each ``(offset, runs)`` of
        ``targets``: the words of ``flat`` from ``offset`` (in words) into ``runs``. ``key``
        names the table (the same key must always mean the same targets)."""
        words = flat.numel()
        if self._staging.numel() < words:
            self._staging = torch.empty(words, dtype=torch.int16, device=self.device)
        self._staging[:words].copy_(flat, non_blocking=True)
        table, longest = self._table(key, targets)
        grid = (-(-longest // _BLOCK), len(targets))
        _scatter_kernel[grid](self._staging, table, BLOCK=_BLOCK)

    def zero(self, key: object, runs: Sequence[Runs]) -> None:
        """Zero every run of ``runs`` (``key`` names the table, as for ``write``)."""
        table, longest = self._table(key, [(0, r) for r in runs])
        _zero_kernel[(-(-longest // _BLOCK), len(runs))](table, BLOCK=_BLOCK)
