"""Preallocated LoRA slots: per target module, every layer's slots in two stacked tensors.

For a target module with ``L`` layers, ``S`` slots and slot rank ``R`` the pool holds

* ``lora_a``  ``[L, S + 1, R, in]``
* ``lora_bt`` ``[L, S + 1, R, out]`` (``lora_B`` transposed, see ``staging``)

and, on the host, each slot's rank and scale (alpha / r): all a batch plan reads. An expert
projection of an MoE layer with ``E`` experts (see ``experts``) holds ``[L, E, S + 1, R, in]``
and ``[L, E, S + 1, R, out]``: expert outside slot, so that one layer's ``(expert, slot)``
pairs flatten into one axis of ``E * (S + 1)`` LoRA groups, ordered as the forward pass sorts
its (token, expert) pairs.

Slot ``S`` is the *zero slot*: never written, it is what rows without an adapter gather. Layer
is the outer axis so that one layer's slots, ``lora_a[l, :k]``, are one contiguous
``[k * R, in]`` matrix: the decode path multiplies by all slots at once (see ``layers``).
Filling a slot is still one copy per stacked pack tensor (``L`` contiguous runs of
``r * in`` elements). A smaller rank fills the first ``r`` rows; the rest stay zero because a
slot is zeroed whenever it is released, so padding needs no work on attach.

The pool only moves tensors. Which revision occupies which slot, and when a slot may be
written, is decided by ``residency.SlotTable`` under the engine's lock.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from engine_plugin import slot_copy
from engine_plugin.shared_work import first_axis_spans, run_shared
from engine_plugin.staging import StagedAdapter, StagedModule, tensor_nbytes

#: Bound on cached slot-view lists (one per slot and adapter layout; layouts are few).
_COPY_TARGETS_LIMIT = 4096


@dataclass(frozen=True)
class TargetModule:
    """A linear module adapted in every decoder layer, named by its path inside the layer;
    ``num_experts`` > 0 for one projection of an MoE experts module (one LoRA per expert)."""

    name: str
    in_features: int
    out_features: int
    num_layers: int
    num_experts: int = 0


class ModuleSlots:
    """The slots of one target module across all layers (see the module docstring)."""

    def __init__(
        self,
        target: TargetModule,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        scales: torch.Tensor,
    ) -> None:
        self.target = target
        self.num_slots = num_slots
        self.max_rank = max_rank
        experts = (target.num_experts,) if target.num_experts else ()
        shape = (target.num_layers, *experts, num_slots + 1, max_rank)
        #: The axis of ``lora_a``/``lora_bt`` indexing slots (the rank axis once one is selected).
        self.slot_axis = len(experts) + 1
        self.lora_a = torch.zeros((*shape, target.in_features), dtype=dtype, device=device)
        self.lora_bt = torch.zeros((*shape, target.out_features), dtype=dtype, device=device)
        # Host mirrors, read when planning a batch (no device round trip).
        self.ranks = [0] * (num_slots + 1)
        self.scalings = [0.0] * (num_slots + 1)
        self._all_layers = tuple(range(target.num_layers))
        # Per-slot views made once: indexing with a tuple of slices costs microseconds a call,
        # and attach does little else.
        self._slot_a = [self.lora_a.select(self.slot_axis, s) for s in range(num_slots + 1)]
        self._slot_bt = [self.lora_bt.select(self.slot_axis, s) for s in range(num_slots + 1)]
        self._rows_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        #: Each slot's scale on the device (a column of ``SlotPool.scales``), for kernels that
        #: route on the device alone (``lora_kernels``, captured graphs).
        self.scales = scales

    def _rows(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``rank`` rows of ``slot``: ``[L, (E,) rank, in]`` and ``[L, (E,) rank, out]``
        views."""
        views = self._rows_cache.get((slot, rank))
        if views is None:
            views = (
                self._slot_a[slot].narrow(self.slot_axis, 0, rank),
                self._slot_bt[slot].narrow(self.slot_axis, 0, rank),
            )
            self._rows_cache[(slot, rank)] = views
        return views

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.lora_a) + tensor_nbytes(self.lora_bt)

    def plan_write(
        self,
        slot: int,
        staged: StagedModule,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        non_blocking: bool,
    ) -> None:
        """Record ``staged`` as ``slot``'s tenant and append the ``(slot view, staged tensor)``
        copies that fill it to ``pairs``; the caller runs them (all modules in one call).

        A module that covers only some layers is scattered here, as it cannot be one view.
        """
        # Recorded first: a copy that fails half way still leaves the slot marked for clearing.
        self.record(slot, staged)
        lora_a, lora_bt = self._rows(slot, staged.rank)
        if staged.layers == self._all_layers:
            pairs.append((lora_a, staged.lora_a))
            pairs.append((lora_bt, staged.lora_bt))
            return
        device = self.lora_a.device
        index = torch.tensor(staged.layers, dtype=torch.long, device=device)
        lora_a.index_copy_(0, index, staged.lora_a.to(device, non_blocking=non_blocking))
        lora_bt.index_copy_(0, index, staged.lora_bt.to(device, non_blocking=non_blocking))

    def is_clear(self, slot: int) -> bool:
        """Whether ``slot`` holds nothing: zero weights, rank and scale."""
        return (
            not bool(self._slot_a[slot].any())
            and not bool(self._slot_bt[slot].any())
            and self.ranks[slot] == 0
            and self.scalings[slot] == 0.0
            and not bool(self.scales[slot])
        )

    def record(self, slot: int, staged: StagedModule) -> None:
        """Note ``staged``'s rank and scale as ``slot``'s (the batch plans read these)."""
        self.ranks[slot] = staged.rank
        self.scalings[slot] = staged.scaling

    def stale_rows(self, slot: int, incoming: StagedModule | None) -> tuple[int, int]:
        """The rows ``[start, stop)`` of ``slot`` that still hold weights after ``incoming``
        is written over them: from ``incoming``'s rank up to the old tenant's (all of them
        when ``incoming`` is None or fills only some layers, as then it overwrites no whole
        row). Rows beyond the old tenant's rank were never written, so they are still zero."""
        old = self.ranks[slot]
        keep = incoming.rank if incoming is not None and incoming.layers == self._all_layers else 0
        return keep, max(old, keep)

    def stale_views(self, slot: int, rows: tuple[int, int]) -> list[torch.Tensor]:
        """``slot``'s A and B views of ``rows`` (from ``stale_rows``; none when empty)."""
        start, stop = rows
        if stop <= start:
            return []
        return [
            view.narrow(self.slot_axis, start, stop - start)
            for view in (self._slot_a[slot], self._slot_bt[slot])
        ]

    def forget(self, slot: int) -> None:
        """Drop ``slot``'s rank and scale (once its weights are zeroed)."""
        self.ranks[slot] = 0
        self.scalings[slot] = 0.0


#: Work of one piece of a shared slot write (elements, a strided one counting
#: ``_STRIDED_COST``): ~0.1 ms, small enough to balance two threads, large enough that the
#: Python around each piece stays a few percent.
_PIECE = 1 << 19
_STRIDED_COST = 3


class SlotPool:
    """Every target module's slots; ``num_slots`` adapters fit, each of rank <= ``max_rank``."""

    def __init__(
        self,
        targets: Mapping[str, TargetModule],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.zero_slot = num_slots
        self.device = device
        self.dtype = dtype
        #: ``[S + 1, modules]``: slot ``s``'s scale in every module, one contiguous row, so an
        #: attach sets them with one copy; each module reads its column.
        self.scales = torch.zeros((num_slots + 1, len(targets)), dtype=torch.float32, device=device)
        self.modules = {
            name: ModuleSlots(t, num_slots, max_rank, dtype, device, self.scales[:, column])
            for column, (name, t) in enumerate(targets.items())
        }
        # Host rows of scales by value, pinned on CUDA so their copy is asynchronous.
        self._scale_rows: dict[tuple[float, ...], torch.Tensor] = {}
        #: One-launch slot writes and zeroing (CUDA); None: ``copy_``/``zero_`` per tensor.
        self.copier = slot_copy.SlotCopier(device) if slot_copy.available(device) else None
        # (slot, layout) -> (word offset in the staged buffer, slot runs) per stacked tensor.
        self._scatter_targets: dict[tuple[int, str], list[tuple[int, slot_copy.Runs]] | None] = {}
        #: Bumped on every write or clear; batch plans cached against it go stale.
        self.generation = 0
        # (slot, StagedAdapter.layout_key) -> the slot views its tensors are copied into.
        self._copy_targets: dict[tuple[int, str | None], list[torch.Tensor]] = {}
        # ("zero", slot, stale rows per module) -> the zeroing kernel's runs (None: not runs).
        self._zero_runs: dict[object, list[slot_copy.Runs] | None] = {}
        #: A thread that takes half of a write with strided sources (CPU; set by the engine).
        self.copy_helper: Executor | None = None

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    def write(self, slot: int, staged: StagedAdapter, *, non_blocking: bool = False) -> int:
        """Copy a staged adapter into ``slot`` (which must be clear); returns bytes copied.

        Modules the adapter does not target stay zero in this slot.
        """
        self.generation += 1
        targets = self._scatter(slot, staged)
        if targets is not None and staged.flat is not None and self.copier is not None:
            for name, module in staged.modules.items():
                self.modules[name].record(slot, module)
            self.copier.write((slot, staged.layout_key), staged.flat, targets)
            self.scales[slot].copy_(self._scale_row(staged), non_blocking=non_blocking)
            return staged.copied_nbytes
        key = (slot, staged.layout_key)
        dsts = self._copy_targets.get(key)
        if dsts is None:
            pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
            for name, module in staged.modules.items():
                self.modules[name].plan_write(slot, module, pairs, non_blocking=non_blocking)
            dsts = [dst for dst, _ in pairs]
            srcs = [src for _, src in pairs]
            if staged.layout_key is not None and len(srcs) == 2 * len(staged.modules):
                # Every module a whole-stack view: the same slot views serve every adapter
                # of this layout, so the next attach skips straight to the copy.
                if len(self._copy_targets) >= _COPY_TARGETS_LIMIT:
                    self._copy_targets.clear()
                self._copy_targets[key] = dsts
        else:
            srcs = staged.copy_sources
            for name, module in staged.modules.items():
                self.modules[name].record(slot, module)
        if dsts:
            self._copy(dsts, srcs, non_blocking=non_blocking)
        self.scales[slot].copy_(self._scale_row(staged), non_blocking=non_blocking)
        return staged.copied_nbytes

    def _copy(
        self, dsts: list[torch.Tensor], srcs: list[torch.Tensor], *, non_blocking: bool
    ) -> None:
        # One call for every stacked tensor: a rank-1 adapter's copies take about as long as
        # the Python dispatch of 14 separate ``copy_`` calls. Strided sources (a borrowed
        # ``lora_B``, transposed as it is copied) are gathers, not memcpys: ~4-5x the time per
        # byte (rank 16, bf16), and they nearly halve on two threads (torch releases the GIL),
        # where a plain copy runs at memory speed on one.
        helper = self.copy_helper
        if helper is None or all(s.is_contiguous() for s in srcs):
            torch._foreach_copy_(dsts, srcs, non_blocking=non_blocking)
            return
        pieces: list[Callable[[], None]] = []
        batch: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        cost = 0
        for dst, src in zip(dsts, srcs, strict=True):
            weight = 1 if src.is_contiguous() else _STRIDED_COST
            per_row = src[0].numel() * weight if src.dim() and len(src) else 0
            for start, stop in first_axis_spans(len(src) if src.dim() else 1, per_row, _PIECE):
                part = (dst, src) if not src.dim() else (dst[start:stop], src[start:stop])
                batch[0].append(part[0])
                batch[1].append(part[1])
                cost += per_row * (stop - start)
                if cost >= _PIECE:
                    pieces.append(functools.partial(torch._foreach_copy_, *batch))
                    batch, cost = ([], []), 0
        if batch[0]:
            pieces.append(functools.partial(torch._foreach_copy_, *batch))
        run_shared(pieces, helper)

    def _scatter(self, slot: int, staged: StagedAdapter) -> list[tuple[int, slot_copy.Runs]] | None:
        """Where each tensor of ``staged.flat`` goes in ``slot``, for the one-launch write; None
        where that cannot serve (no copier, no flat buffer, a module covering some layers)."""
        if self.copier is None or staged.flat is None or staged.layout_key is None:
            return None
        key = (slot, staged.layout_key)
        if key in self._scatter_targets:
            return self._scatter_targets[key]
        base = staged.flat.data_ptr()
        targets: list[tuple[int, slot_copy.Runs]] | None = []
        for name, module in staged.modules.items():
            slots = self.modules[name]
            if module.layers != slots._all_layers:  # not one whole-stack view: scattered apart
                targets = None
                break
            views = slots._rows(slot, module.rank)
            for view, source in zip(views, (module.lora_a, module.lora_bt), strict=True):
                runs = slot_copy.as_runs(view)
                if runs is None or targets is None:
                    targets = None
                    break
                targets.append(((source.data_ptr() - base) // 2, runs))
        if len(self._scatter_targets) >= _COPY_TARGETS_LIMIT:
            self._scatter_targets.clear()
        # The offsets depend on the layout alone: staging carves tensors in module order.
        self._scatter_targets[key] = targets
        return targets

    def _scale_row(self, staged: StagedAdapter) -> torch.Tensor:
        values = tuple(
            m.scaling if (m := staged.modules.get(name)) is not None else 0.0
            for name in self.modules
        )
        row = self._scale_rows.get(values)
        if row is None:
            row = torch.tensor(values, dtype=torch.float32)
            if self.device.type == "cuda":
                row = row.pin_memory()
            if len(self._scale_rows) >= _COPY_TARGETS_LIMIT:
                self._scale_rows.clear()
            self._scale_rows[values] = row
        return row

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every module, so stale weights never reach a later tenant."""
        self._zero_stale(slot, None)
        self.generation += 1

    def replace(self, slot: int, staged: StagedAdapter, *, non_blocking: bool = False) -> int:
        """Evict ``slot``'s tenant and write ``staged`` there; returns the bytes copied.

        Leaves the slot exactly as ``clear`` then ``write`` would, without zeroing what the
        copy overwrites anyway: only rows beyond the new tenant's rank, and modules it does not
        target, are zeroed (a rank-1 adapter evicting another halves its attach time).
        """
        self._zero_stale(slot, staged)
        return self.write(slot, staged, non_blocking=non_blocking)

    def _zero_stale(self, slot: int, incoming: StagedAdapter | None) -> None:
        """Zero what ``slot``'s tenant left that ``incoming`` (None: nothing) will not
        overwrite, and forget the tenant's ranks and scales."""
        stale = tuple(
            module.stale_rows(slot, incoming.modules.get(name) if incoming is not None else None)
            for name, module in self.modules.items()
        )
        # The zeroing kernel's runs depend on the slot and these rows alone: worked out once
        # (building ~15 views and their runs was ~40 us of Python a detach).
        key = ("zero", slot, stale)
        runs: list[slot_copy.Runs] | None = None
        if self.copier is not None:
            if key in self._zero_runs:
                runs = self._zero_runs[key]
            else:
                found = [slot_copy.as_runs(v) for v in self._stale_views(slot, stale)]
                runs = [r for r in found if r is not None] if None not in found else None
                if len(self._zero_runs) >= _COPY_TARGETS_LIMIT:
                    self._zero_runs.clear()
                self._zero_runs[key] = runs
        if self.copier is not None and runs is not None:
            self.copier.zero(key, runs)
        else:
            torch._foreach_zero_(self._stale_views(slot, stale))
        for module in self.modules.values():
            module.forget(slot)

    def _stale_views(self, slot: int, stale: tuple[tuple[int, int], ...]) -> list[torch.Tensor]:
        views = [
            view
            for module, rows in zip(self.modules.values(), stale, strict=True)
            for view in module.stale_views(slot, rows)
        ]
        views.append(self.scales[slot])
        return views

    def is_clear(self, slot: int) -> bool:
        """Whether every tensor of ``slot`` is zero (a check for tests and ``verify``)."""
        return all(m.is_clear(slot) for m in self.modules.values())
