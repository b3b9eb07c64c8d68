"""Multi-LoRA linear layers: every row of a batch gets its own adapter's delta in one batched op.

A wrapped linear computes ``y = base(x) + scale[s] * (x @ A[s]^T) @ B[s]^T`` with ``s`` the slot
of the row's adapter (the zero slot for rows without one). Two equivalent ways to do it, picked
per call from the number of tokens per row, because their costs scale differently:

* **gather** (prefill): gather each row's ``A``/``B^T`` by slot index and run two ``bmm`` over
  the batch (Punica's BGMV/SGMV idea expressed with stock torch ops). The gather copies
  ``rows x r x (in + out)`` weights, negligible next to ``rows x tokens`` worth of activations.
* **wide** (decode, a few tokens per row): multiply by the first ``k`` slots side by side, one
  ``[k * R, in]`` matrix, then mask each row to its own slot's ``R`` columns (the mask also
  carries the scale) and multiply by the matching ``[k * R, out]`` matrix. Each active
  adapter's weights are read once and nothing is copied; the extra flops on masked columns
  are free when a step is bound by memory bandwidth, as a decode step is.

The per-row routing (the *batch plan*) is thread-local state set by the engine around a forward
or generate call, the same arrangement as vLLM's punica wrapper, so the wrapped model keeps the
exact signature of the original and concurrent callers on other threads never see each other's
plans.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine_plugin import lora_kernels
from engine_plugin.slots import ModuleSlots, SlotPool

#: Up to this many tokens per row a call takes the wide path (decode, speculative steps).
WIDE_MAX_TOKENS_PER_ROW = 4
#: The wide path reads every slot up to the highest one in use; beyond this many slots per row
#: of the batch, gathering is cheaper than reading unused slots.
WIDE_MAX_SLOTS_PER_ROW = 2


@dataclass(frozen=True)
class ModulePlan:
    """How one target module adds LoRA deltas for one batch (shared by all its layers).

    ``index`` ``[rows]`` is each row's slot; ``row_scale`` ``[rows, 1, 1]`` its scaling (0 for
    base rows); ``rank`` the largest rank among the rows' adapters. ``wide_slots`` (k),
    ``wide_mask`` ``[rows, 1, k * R]`` (each row's scale on its own slot's columns, 0 elsewhere)
    and ``wide_drop`` (where the mask is 0) drive the wide path, or are 0 / None where it does
    not pay.
    """

    index: torch.Tensor
    row_scale: torch.Tensor
    rank: int
    wide_slots: int
    wide_mask: torch.Tensor | None
    wide_drop: torch.Tensor | None


@dataclass(frozen=True)
class BatchPlan:
    """Per-row routing of one batch: a plan per target module, None where no row adapts it.

    ``fused_index`` (``[rows]`` slots on the device) is set where the fused kernel of
    ``lora_kernels`` adds the deltas (CUDA): it routes from that tensor and the pool's device
    scales alone. A ``static`` plan (captured graphs, see ``graphs``) has no per-module plans:
    every dense module launches the kernel, whichever slots ``fused_index`` holds at replay.
    """

    rows: int
    row_slots: tuple[int, ...]
    modules: dict[str, ModulePlan | None]
    fused_index: torch.Tensor | None = None
    static: bool = False


class BatchContext(threading.local):
    """The plan of the batch running on the current thread (None: every row is base)."""

    plan: BatchPlan | None = None


def plan_batch(pool: SlotPool, row_slots: Sequence[int]) -> BatchPlan:
    """Build the plan for a batch whose row ``i`` uses slot ``row_slots[i]``.

    Base rows carry ``pool.zero_slot``. Runs on the host from the pool's host mirrors.
    """
    rows = len(row_slots)
    device = pool.device
    index = torch.tensor(row_slots, dtype=torch.long).to(device, non_blocking=True)
    modules: dict[str, ModulePlan | None] = {}
    for name, slots in pool.modules.items():
        modules[name] = _plan_module(slots, row_slots, index, pool.dtype, device)
    return BatchPlan(
        rows=rows,
        row_slots=tuple(row_slots),
        modules=modules,
        fused_index=index if lora_kernels.kernel_available(device) else None,
    )


def _plan_module(
    slots: ModuleSlots,
    row_slots: Sequence[int],
    index: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> ModulePlan | None:
    ranks, scalings = slots.ranks, slots.scalings
    active = sorted({s for s in row_slots if ranks[s]})
    if not active:
        return None
    rows = len(row_slots)
    row_scale = torch.tensor([scalings[s] for s in row_slots], dtype=dtype)
    wide_slots = active[-1] + 1
    wide_mask = wide_drop = None
    # Expert projections always group by (expert, slot) (see ``experts``): no wide path.
    if not slots.target.num_experts and wide_slots <= WIDE_MAX_SLOTS_PER_ROW * rows:
        mask = torch.zeros(rows, wide_slots, dtype=dtype)
        for row, s in enumerate(row_slots):
            if s < wide_slots and ranks[s]:
                mask[row, s] = scalings[s]
        wide_mask = mask.repeat_interleave(slots.max_rank, dim=1).view(rows, 1, -1)
        wide_drop = (wide_mask == 0).to(device, non_blocking=True)
        wide_mask = wide_mask.to(device, non_blocking=True)
    else:
        wide_slots = 0
        wide_drop = None
    return ModulePlan(
        index=index,
        row_scale=row_scale.view(rows, 1, 1).to(device, non_blocking=True),
        rank=max(ranks[s] for s in active),
        wide_slots=wide_slots,
        wide_mask=wide_mask,
        wide_drop=wide_drop,
    )


class MultiLoRALinear(nn.Module):
    """A base ``nn.Linear`` plus the LoRA slots of one layer of one target module.

    Behaves exactly like the base linear when no batch plan is set on the current thread.
    """

    def __init__(
        self, base: nn.Linear, slots: ModuleSlots, layer: int, context: BatchContext
    ) -> None:
        super().__init__()
        self.base = base
        self.module_name = slots.target.name
        self.layer = layer
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.max_rank = slots.max_rank
        self._context = context
        # Views into the pool, made once: [S + 1, R, in] and [S + 1, R, out] of this layer.
        self._lora_a = slots.lora_a[layer]
        self._lora_bt = slots.lora_bt[layer]
        self._scales = slots.scales
        #: Set when siblings read the same input (q/k/v, gate/up): see ``LinearGroup``.
        self.group: LinearGroup | None = None

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, layer={self.layer}, max_rank={self.max_rank}"

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that inspects ``.weight`` keeps working)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._context.plan
        if plan is not None and plan.fused_index is not None:
            if self.group is not None:
                return self.group.output(self, x, plan.fused_index, plan.rows)
            return lora_kernels.add_lora_group_over(
                lambda: [self.base(x)],
                x,
                [self._lora_a],
                [self._lora_bt],
                [self._scales],
                plan.fused_index,
                plan.rows,
            )[0]
        out: torch.Tensor = self.base(x)
        if plan is None:
            return out
        module = plan.modules.get(self.module_name)
        if module is None:
            if plan.static:
                raise ValueError("a static batch plan needs fused_index")
            return out
        rows = plan.rows
        tokens = x.numel() // (rows * self.in_features)
        if module.wide_slots and tokens <= WIDE_MAX_TOKENS_PER_ROW:
            add_wide(x, out, self._lora_a, self._lora_bt, module, rows, tokens)
        else:
            add_gathered(x, out, self._lora_a, self._lora_bt, module, rows, tokens)
        return out


#: Sibling linears that a decoder layer calls on one input tensor, by their last path part.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LinearGroup(threading.local):
    """Siblings that read one input (q/k/v; gate/up): one kernel launch adds all their deltas.

    Whichever member is called first computes every member's base output and adds their
    deltas in one ``add_lora_group``; the others, called next on the very same input tensor,
    return their output from this thread's stash. A member called on another input (a model
    that does not share it after all) simply recomputes the group, so the result is always
    what the members would compute alone.
    """

    def __init__(self, members: Sequence[MultiLoRALinear]) -> None:
        self.members = tuple(members)
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def output(
        self, member: MultiLoRALinear, x: torch.Tensor, index: torch.Tensor, rows: int
    ) -> torch.Tensor:
        if self._input is x:
            stashed = self._pending.pop(id(member), None)
            if stashed is not None:
                if not self._pending:
                    self._input = None
                return stashed
        outs = lora_kernels.add_lora_group_over(
            lambda: [m.base(x) for m in self.members],
            x,
            [m._lora_a for m in self.members],
            [m._lora_bt for m in self.members],
            [m._scales for m in self.members],
            index,
            rows,
        )
        self._input = x
        self._pending = {id(m): o for m, o in zip(self.members, outs, strict=True)}
        return self._pending.pop(id(member))


def group_shared_inputs(layer: nn.Module) -> list[LinearGroup]:
    """Join the wrapped sibling linears of ``layer`` that read one input into groups."""
    wrapped = {
        name: m for name, m in layer.named_modules() if isinstance(m, MultiLoRALinear) and name
    }
    groups = []
    for names in SHARED_INPUT_GROUPS:
        parents: dict[str, list[MultiLoRALinear]] = {}
        for path, module in wrapped.items():
            parent, _, last = path.rpartition(".")
            if last in names:
                parents.setdefault(parent, []).append(module)
        for members in parents.values():
            members.sort(key=lambda m: names.index(m.module_name.rpartition(".")[2]))
            same_input = len({m.in_features for m in members}) == 1
            if len(members) > 1 and same_input and len(members) <= lora_kernels.MAX_GROUP:
                group = LinearGroup(members)
                for member in members:
                    member.group = group
                groups.append(group)
    return groups


def add_gathered(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    plan: ModulePlan,
    rows: int,
    tokens: int,
) -> None:
    """``out[b] += scale[b] * x[b] @ A[s_b]^T @ B[s_b]^T`` for every row ``b``, in place."""
    r = plan.rank
    a = lora_a[:, :r].index_select(0, plan.index)  # [rows, r, in]
    bt = lora_bt[:, :r].index_select(0, plan.index)  # [rows, r, out]
    h = torch.bmm(x.reshape(rows, tokens, -1), a.transpose(1, 2))
    h.mul_(plan.row_scale)
    out.view(rows, tokens, -1).baddbmm_(h, bt)


def add_wide(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    plan: ModulePlan,
    rows: int,
    tokens: int,
) -> None:
    """The same sum through the first ``k`` slots side by side and a per-row mask, in place.

    Other rows' columns are *filled* with zeros after scaling rather than only multiplied by
    zero: another tenant's weights may overflow to inf on this row's input, and inf * 0 is NaN.
    """
    if plan.wide_mask is None or plan.wide_drop is None:
        raise ValueError("this batch plan has no wide path for the module")
    k, n = plan.wide_slots, rows * tokens
    a = lora_a[:k].view(-1, lora_a.shape[-1])  # [k * R, in]
    bt = lora_bt[:k].view(-1, lora_bt.shape[-1])  # [k * R, out]
    h = torch.mm(x.reshape(n, -1), a.t())
    h.view(rows, tokens, -1).mul_(plan.wide_mask).masked_fill_(plan.wide_drop, 0.0)
    out.view(n, -1).addmm_(h, bt)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a transformers causal LM (``model.model.layers``).

    Raises:
        ValueError: the model has no recognisable decoder layer stack.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def linear_targets(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside one decoder layer, by its path inside the layer."""
    return {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and name
    }


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)
