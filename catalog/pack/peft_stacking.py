"""Stacking one pack module from its grouped PEFT tensors, per layout.

A dense module stacks one ``lora_A``/``lora_B`` pair per layer; a per-expert one a pair per
layer and expert, in (layer, expert) order; a fused ``target_parameters`` one a pair per layer
whose rows (``lora_A``) and columns (``lora_B``) hold every expert (see
:mod:`catalog.pack.peft_experts`). Stacking is concatenation: the parts returned are views into
the PEFT file, copied once when the pack is written. Every pair is checked against the module's
first (shapes, rank, alpha) before it is stacked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NoReturn

from catalog.errors import InvalidPack
from catalog.pack.manifest import ModuleSpec
from catalog.pack.peft_checks import ModuleChecker, PeftPatterns
from catalog.pack.peft_experts import (
    LAYOUT_PEFT_PARAMETER,
    LAYOUT_PER_EXPERT,
    experts_b_from_peft,
)
from catalog.pack.peft_files import PEFT_CONFIG_FILE
from catalog.pack.peft_keys import ModuleGroup

_DENSE = "dense"


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


def stack_module(
    name: str, group: ModuleGroup, patterns: PeftPatterns, model_prefix: str, experts: int
) -> tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]]:
    """(spec, lora_A byte parts, lora_B byte parts in PEFT's orientation) of module ``name``,
    stacked as its layout says; ``model_prefix`` is the layer prefix as the config's patterns
    see it, ``experts`` the experts per layer of an expert module.

    Raises:
        InvalidPack: a pair that is not 2-D, or whose shape, rank or alpha differs from the
            module's first pair or the config; a missing or extra expert.
    """
    stack = _STACKERS[group.layout.kind if group.layout else _DENSE]
    return stack(name, group, patterns, model_prefix, experts)


#: Stacks one module: (name, group, patterns, model prefix, experts) ->
#: (spec, lora_A byte parts, lora_B byte parts).
_Stacker = Callable[
    [str, ModuleGroup, PeftPatterns, str, int],
    tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]],
]


def _stack_dense(
    name: str, group: ModuleGroup, patterns: PeftPatterns, model_prefix: str, experts: int
) -> tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]]:
    layers = tuple(sorted(group.tensors))
    pairs = [group.tensors[layer][None] for layer in layers]
    first_a, first_b = pairs[0]["A"], pairs[0]["B"]
    if len(first_a.shape) != 2 or len(first_b.shape) != 2:
        _fail(f"module {name!r}: lora_A/lora_B must be 2-D, got {first_a.shape}, {first_b.shape}")
    checker = ModuleChecker(name, patterns)
    alpha = 0.0
    checked = pairs
    if patterns.uniform and all(
        p["A"].shape == first_a.shape and p["B"].shape == first_b.shape for p in pairs
    ):
        # Every layer is checked against the same rank and alpha and has the first layer's
        # shapes: checking the first layer checks them all (the per-layer loop below, with its
        # two pattern lookups per layer, was a fifth of a dense plan's stacking).
        checked = pairs[:1]
    for layer, pair in zip(layers, checked, strict=False):
        a, b = pair["A"], pair["B"]
        alpha = checker.check(
            f"layer {layer}", f"{model_prefix}.{layer}.{name}", a.shape, b.shape, a.shape[0]
        )
    rank, in_features = first_a.shape
    spec = ModuleSpec(name, in_features, first_b.shape[0], rank, alpha, layers)
    return spec, [p["A"].data for p in pairs], [p["B"].data for p in pairs]


def _stack_per_expert(
    name: str, group: ModuleGroup, patterns: PeftPatterns, model_prefix: str, experts: int
) -> tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]]:
    assert group.layout is not None
    layers = tuple(sorted(group.tensors))
    checker = ModuleChecker(name, patterns)
    a_parts: list[bytes | memoryview] = []
    b_parts: list[bytes | memoryview] = []
    alpha = 0.0
    for layer in layers:
        by_expert = group.tensors[layer]
        found = sorted(e for e in by_expert if e is not None)
        missing = sorted(set(range(experts)) - set(found))
        extra = [e for e in found if e >= experts]
        if missing:
            _fail(
                f"module {name!r} layer {layer}: experts {missing} are missing ({len(found)} of "
                f"{experts} present); a pack holds every expert"
            )
        if extra:
            _fail(f"module {name!r} layer {layer}: expert {extra[0]} is beyond {experts} experts")
        for expert in range(experts):
            a, b = by_expert[expert]["A"], by_expert[expert]["B"]
            if len(a.shape) != 2 or len(b.shape) != 2:
                _fail(f"module {name!r} layer {layer} expert {expert}: lora_A/lora_B must be 2-D")
            key = f"{model_prefix}.{layer}.{group.layout.key_module_of(expert)}"
            alpha = checker.check(
                f"layer {layer} expert {expert}", key, a.shape, b.shape, a.shape[0]
            )
            a_parts.append(a.data)
            b_parts.append(b.data)
    first = group.tensors[layers[0]][0]
    rank, in_features = first["A"].shape
    spec = ModuleSpec(
        name, in_features, first["B"].shape[0], rank, alpha, layers, num_experts=experts
    )
    return spec, a_parts, b_parts


def _stack_peft_parameter(
    name: str, group: ModuleGroup, patterns: PeftPatterns, model_prefix: str, experts: int
) -> tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]]:
    layers = tuple(sorted(group.tensors))
    checker = ModuleChecker(name, patterns)
    a_parts: list[bytes | memoryview] = []
    b_parts: list[bytes | memoryview] = []
    alpha = 0.0
    rank = in_features = out_features = 0
    for layer in layers:
        a, b = group.tensors[layer][None]["A"], group.tensors[layer][None]["B"]
        where = f"module {name!r} layer {layer}"
        if len(a.shape) != 2 or len(b.shape) != 2:
            _fail(f"{where}: lora_A/lora_B must be 2-D, got {list(a.shape)}, {list(b.shape)}")
        key = f"{model_prefix}.{layer}.{name}"
        rank = patterns.rank(key)
        rows, in_features = a.shape
        out_features, columns = b.shape
        if columns != rows:
            _fail(
                f"{where}: lora_B has {columns} columns but lora_A has {rows} rows; both must "
                "be experts x rank"
            )
        if rows != experts * rank:
            _fail(
                f"{where}: lora_A has {rows} rows, not {experts} experts x rank {rank} "
                f"(rank from {PEFT_CONFIG_FILE})"
            )
        if experts < 2:
            _fail(
                f"{where}: one expert: target_parameters on a 2-D parameter is not supported "
                "(target its module with target_modules)"
            )
        alpha = checker.check(f"layer {layer}", key, a.shape, b.shape, rank)
        a_parts.append(a.data)
        b_parts.append(experts_b_from_peft(b, experts))
    spec = ModuleSpec(name, in_features, out_features, rank, alpha, layers, num_experts=experts)
    return spec, a_parts, b_parts


_STACKERS: dict[str, _Stacker] = {
    _DENSE: _stack_dense,
    LAYOUT_PER_EXPERT: _stack_per_expert,
    LAYOUT_PEFT_PARAMETER: _stack_peft_parameter,
}


def count_experts(
    groups: Mapping[str, ModuleGroup], patterns: PeftPatterns, model_prefix: str
) -> int:
    """Experts per layer as the tensors show them: the largest expert index + 1 of a per-expert
    module, or lora_A rows / rank of a fused one (each module is checked against it later)."""
    counts = [0]
    for name, group in groups.items():
        if group.layout is None:
            continue
        for layer, by_expert in group.tensors.items():
            if group.layout.kind == LAYOUT_PER_EXPERT:
                counts.append(max(e for e in by_expert if e is not None) + 1)
            else:
                rows = by_expert[None]["A"].shape[0]
                rank = patterns.rank(f"{model_prefix}.{layer}.{name}")
                counts.append(rows // rank if rank > 0 and rows % rank == 0 else 0)
    return max(counts)
