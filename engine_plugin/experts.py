"""Multi-LoRA on MoE experts: every routed (token, expert) pair gets its row's adapter's LoRA
for that expert, for all rows of a mixed batch in one batched operation per projection.

The base
--------
transformers 5 MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) hold their experts in one
module with fused 3-D parameters ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``
(``[E, out, in]``; ``gate_up_proj``'s output is chunked as (gate, up)), called as
``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``. Its default
implementation (``experts_implementation="grouped_mm"``) sorts the ``T * K`` (token, expert)
pairs by expert and runs one grouped matmul per projection; the ``eager`` one loops over
experts. Neither leaves room for a per-row delta between the projections and the activation,
so :class:`MultiLoRAExperts` replaces the module and computes the same function itself, with
the base's own weights and gate, in the ``grouped_mm`` way:

1. each pair's key is ``expert * (S + 1) + slot`` (``slot`` that of its token's row, the zero
   slot for base rows); one sort by key groups the pairs by expert (the base's grouped matmul)
   and, within an expert, by slot (the LoRA groups);
2. per projection, the base grouped matmul over experts, then the LoRA delta as two grouped
   matmuls over the (expert, slot) groups present in the batch, their ``A``/``B^T`` gathered by
   group from the slot pool (Punica's SGMV with the segment index being (expert, slot));
3. routing weights, un-sort, sum over the ``K`` choices, as transformers does.

There is no loop over adapters or experts; batches in which no row adapts this layer's experts
call the base module unchanged.

The slots
---------
Each experts module gets three slot modules, one per projection, as vLLM keeps its ``w1``,
``w3`` and ``w2`` LoRA stacks: ``{path}.gate_proj`` (H -> I), ``{path}.up_proj`` (H -> I),
``{path}.down_proj`` (I -> H), each ``[L, E, S + 1, R, in]`` / ``[L, E, S + 1, R, out]``. Pack
modules reach them by :func:`expert_routes`:

* the fused layout's ``{path}.gate_up_proj`` (rank r, out 2I) is exactly two LoRAs sharing
  ``A``: ``(A, B[:I])`` on gate and ``(A, B[I:])`` on up, so it fills rank-r slots;
* the per-expert layout's ``w1``/``gate_proj`` -> gate, ``w3``/``up_proj`` -> up,
  ``w2``/``down_proj`` -> down, each at its own rank (rank r per projection needs rank-r slots,
  where one fused gate_up slot would need 2r for separate gate and up LoRAs);
* transformers renames ``block_sparse_moe`` to ``mlp`` when it loads older Mixtral checkpoints
  (its ``conversion_mapping``), so a pack module ``block_sparse_moe.experts.w1`` finds the
  experts at ``mlp.experts`` when the base has no ``block_sparse_moe``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine_plugin.layers import BatchContext, ModulePlan
from engine_plugin.slots import ModuleSlots
from engine_plugin.staging import SlotRoute

#: Slot module names of one experts module, after its path: (gate, up, down).
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: Pack projection names -> the slot projections they fill, with the half of the pack's
#: ``lora_B`` rows each takes (None: all of them).
_PACK_PROJECTIONS: dict[str, tuple[tuple[str, int | None], ...]] = {
    "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
    "gate_proj": (("gate_proj", None),),
    "w1": (("gate_proj", None),),
    "up_proj": (("up_proj", None),),
    "w3": (("up_proj", None),),
    "down_proj": (("down_proj", None),),
    "w2": (("down_proj", None),),
}
#: Module path renames transformers applies to older checkpoints (first part of the path).
_PATH_ALIASES = {"block_sparse_moe": "mlp"}
#: LoRA ranks used in a grouped matmul are padded to a multiple of this (zero rows), keeping
#: the gathered weights' row strides 16-byte aligned for grouped matmul kernels.
_RANK_ALIGN = 8


@dataclass(frozen=True)
class ExpertsTarget:
    """One fused experts module in every decoder layer, at ``path`` inside the layer."""

    path: str
    num_experts: int
    hidden: int
    intermediate: int

    def slot_module(self, projection: str) -> str:
        return f"{self.path}.{projection}"

    def features(self, projection: str) -> tuple[int, int]:
        """``(in, out)`` of a slot projection."""
        if projection == "down_proj":
            return self.intermediate, self.hidden
        return self.hidden, self.intermediate


def fused_experts_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """``(E, H, I)`` when ``module`` is a fused experts module this engine can wrap: its own
    ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``, no biases, not
    transposed (GPT-OSS style experts are not served). None otherwise."""
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return None
    if (
        getattr(module, "is_transposed", False)
        or not getattr(module, "is_concatenated", True)
        or getattr(module, "has_bias", False)
        or not getattr(module, "has_gate", True)
        or getattr(module, "has_post_expert_norm", False)
    ):
        return None
    experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    if two_inter % 2 or tuple(down.shape) != (experts, hidden, inter):
        return None
    return experts, hidden, inter


def find_experts(layer: nn.Module) -> dict[str, ExpertsTarget]:
    """Every wrappable fused experts module inside one decoder layer, by path."""
    found = {}
    for name, module in layer.named_modules():
        shape = fused_experts_shape(module) if name else None
        if shape is not None:
            found[name] = ExpertsTarget(name, *shape)
    return found


def expert_routes(name: str, targets: Mapping[str, ExpertsTarget]) -> list[SlotRoute] | None:
    """The slot modules an expert pack module ``name`` fills, or None when no experts module
    of this base takes it (``targets`` by path)."""
    path, _, projection = name.rpartition(".")
    parts = _PACK_PROJECTIONS.get(projection)
    if parts is None or not path:
        return None
    target = targets.get(path)
    if target is None:
        first, dot, rest = path.partition(".")
        alias = _PATH_ALIASES.get(first)
        target = targets.get(f"{alias}{dot}{rest}") if alias is not None else None
    if target is None:
        return None
    inter = target.intermediate
    return [
        SlotRoute(
            target.slot_module(slot),
            None if half is None else (half * inter, (half + 1) * inter),
        )
        for slot, half in parts
    ]


def segment_mm(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``out[i] = x[i] @ weight[g]`` for the rows ``i`` of segment ``g`` (``ends`` int32, the
    cumulative segment ends; ``weight`` ``[G, in, out]``): one grouped matmul."""
    return torch.nn.functional.grouped_mm(x, weight, offs=ends)


class MultiLoRAExperts(nn.Module):
    """A fused experts module plus the LoRA slots of its three projections in one layer.

    ``slots`` are the gate, up and down projections' slots, in that order (``PROJECTIONS``).
    Behaves exactly like the base module when no row of the current batch adapts it.

    Raises (from forward):
        ValueError: the routed tokens do not split evenly into the batch plan's rows.
    """

    def __init__(
        self,
        base: nn.Module,
        target: ExpertsTarget,
        slots: Sequence[ModuleSlots],
        layer: int,
        context: BatchContext,
    ) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.layer = layer
        self._context = context
        self.module_names = tuple(s.target.name for s in slots)
        self._groups_per_expert = slots[0].num_slots + 1
        self._max_rank = slots[0].max_rank
        # This layer's slots with (expert, slot) flattened into one group axis, made once:
        # [E * (S + 1), R, in] and [E * (S + 1), R, out].
        self._lora = tuple(
            (s.lora_a[layer].flatten(0, 1), s.lora_bt[layer].flatten(0, 1)) for s in slots
        )

    def extra_repr(self) -> str:
        return f"path={self.target.path!r}, layer={self.layer}, experts={self.target.num_experts}"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        plan = self._context.plan
        if plan is None:
            return self.base(hidden_states, top_k_index, top_k_weights)  # type: ignore[no-any-return]
        modules = tuple(plan.modules.get(name) for name in self.module_names)
        if all(m is None for m in modules):
            return self.base(hidden_states, top_k_index, top_k_weights)  # type: ignore[no-any-return]
        return self._adapted(hidden_states, top_k_index, top_k_weights, plan.rows, modules)

    def _adapted(
        self,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        rows: int,
        modules: tuple[ModulePlan | None, ...],
    ) -> torch.Tensor:
        tokens, top_k = top_k_index.shape
        pairs = tokens * top_k
        if pairs % rows:
            raise ValueError(f"{tokens} tokens do not split into the batch's {rows} rows")
        pairs_per_row = pairs // rows
        row_index = next(m for m in modules if m is not None).index
        base = self.base
        # Sort the pairs by (expert, slot): grouped by expert for the base, by group for LoRA.
        expert = top_k_index.reshape(-1)
        key = expert * self._groups_per_expert + row_index.repeat_interleave(pairs_per_row)
        key, order = torch.sort(key)
        x = hidden[order // top_k]
        pair_row = order // pairs_per_row
        expert_ends = torch.cumsum(
            torch.bincount(expert, minlength=self.target.num_experts), 0, dtype=torch.int32
        )
        groups, counts = torch.unique_consecutive(key, return_counts=True)
        lora = _Groups(groups, torch.cumsum(counts, 0, dtype=torch.int32), pair_row)

        gate_plan, up_plan, down_plan = modules
        gate_lora, up_lora, down_lora = self._lora
        h = segment_mm(x, base.get_parameter("gate_up_proj").transpose(1, 2), expert_ends)
        inter = self.target.intermediate
        if gate_plan is not None:
            lora.add(h[:, :inter], x, gate_lora, gate_plan, self._max_rank)
        if up_plan is not None:
            lora.add(h[:, inter:], x, up_lora, up_plan, self._max_rank)
        h = _apply_gate(base, h)
        y = segment_mm(h, base.get_parameter("down_proj").transpose(1, 2), expert_ends)
        if down_plan is not None:
            lora.add(y, h, down_lora, down_plan, self._max_rank)
        weighted = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        unsorted = torch.empty_like(weighted)
        unsorted[order] = weighted
        out = unsorted.view(tokens, top_k, -1).sum(dim=1)
        return out.to(hidden.dtype)


def _apply_gate(base: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The base's own gating of ``[P, 2I]`` projections (``act(gate) * up`` by default)."""
    apply_gate = getattr(base, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gate_up)  # type: ignore[no-any-return]
    gate, up = gate_up.chunk(2, dim=-1)
    return base.act_fn(gate) * up  # type: ignore[no-any-return,operator]


@dataclass(frozen=True)
class _Groups:
    """The (expert, slot) groups of one batch's sorted pairs: group ids ``[U]``, their
    cumulative ends ``[U]`` (int32) and each sorted pair's batch row ``[P]``."""

    ids: torch.Tensor
    ends: torch.Tensor
    pair_row: torch.Tensor

    def add(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        lora: tuple[torch.Tensor, torch.Tensor],
        plan: ModulePlan,
        max_rank: int,
    ) -> None:
        """``out[p] += scale[row(p)] * x[p] @ A[g(p)]^T @ B[g(p)]^T`` for every sorted pair, in
        place: two grouped matmuls over the groups, weights gathered by group."""
        rank = min(max_rank, -(-plan.rank // _RANK_ALIGN) * _RANK_ALIGN)
        lora_a, lora_bt = lora
        a = lora_a.narrow(1, 0, rank).index_select(0, self.ids)  # [U, r, in]
        bt = lora_bt.narrow(1, 0, rank).index_select(0, self.ids)  # [U, r, out]
        h = segment_mm(x, a.transpose(1, 2), self.ends)  # [P, r]
        h.mul_(plan.row_scale.view(-1).index_select(0, self.pair_row).unsqueeze(-1))
        out.add_(segment_mm(h, bt, self.ends))
