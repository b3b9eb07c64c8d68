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

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine_plugin.staging import StagedAdapter, StagedModule, tensor_nbytes


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

    def write(self, slot: int, staged: StagedModule, *, non_blocking: bool) -> int:
        """Copy one staged module into ``slot``; returns the bytes copied."""
        r = staged.rank
        # Recorded first: a copy that fails half way still leaves the slot marked for clearing.
        self.ranks[slot] = r
        lora_a, lora_bt = self._rows(slot, r)
        if staged.layers == self._all_layers:
            lora_a.copy_(staged.lora_a, non_blocking=non_blocking)
            lora_bt.copy_(staged.lora_bt, non_blocking=non_blocking)
        else:
            device = self.lora_a.device
            index = torch.tensor(staged.layers, dtype=torch.long, device=device)
            lora_a.index_copy_(0, index, staged.lora_a.to(device, non_blocking=non_blocking))
            lora_bt.index_copy_(0, index, staged.lora_bt.to(device, non_blocking=non_blocking))
        self.scalings[slot] = staged.scaling
        return staged.nbytes

    def is_clear(self, slot: int) -> bool:
        """Whether ``slot`` holds nothing: zero weights, rank and scale."""
        return (
            not bool(self._slot_a[slot].any())
            and not bool(self._slot_bt[slot].any())
            and self.ranks[slot] == 0
            and self.scalings[slot] == 0.0
        )

    def clear(self, slot: int) -> None:
        """Zero ``slot`` (weights, scale, rank)."""
        rank = self.ranks[slot]
        if rank:
            # Rows beyond the tenant's rank were never written: they are still zero.
            lora_a, lora_bt = self._rows(slot, rank)
            lora_a.zero_()
            lora_bt.zero_()
        self.ranks[slot] = 0
        self.scalings[slot] = 0.0


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
        self.modules = {
            name: ModuleSlots(t, num_slots, max_rank, dtype, device) for name, t in targets.items()
        }
        #: Bumped on every write or clear; batch plans cached against it go stale.
        self.generation = 0

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    def write(self, slot: int, staged: StagedAdapter, *, non_blocking: bool = False) -> int:
        """Copy a staged adapter into ``slot`` (which must be clear); returns bytes copied.

        Modules the adapter does not target stay zero in this slot.
        """
        moved = 0
        for name, module in staged.modules.items():
            moved += self.modules[name].write(slot, module, non_blocking=non_blocking)
        self.generation += 1
        return moved

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every module, so stale weights never reach a later tenant."""
        for module in self.modules.values():
            module.clear(slot)
        self.generation += 1

    def is_clear(self, slot: int) -> bool:
        """Whether every tensor of ``slot`` is zero (a check for tests and ``verify``)."""
        return all(m.is_clear(slot) for m in self.modules.values())
