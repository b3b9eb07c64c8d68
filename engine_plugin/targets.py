"""Which modules of a decoder layer get LoRA slots, and their shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from engine_plugin.experts import PROJECTIONS, ExpertsTarget, find_experts
from engine_plugin.layers import linear_targets
from engine_plugin.slots import TargetModule


def find_targets(
    layers: nn.ModuleList, wanted: Sequence[str] | None
) -> tuple[Mapping[str, tuple[TargetModule, torch.Tensor]], dict[str, ExpertsTarget]]:
    """The slot modules to allocate (with a base weight each, for its dtype) and the
    experts modules among them: ``wanted`` paths inside a decoder layer (or a suffix of one),
    every linear and experts module of the layer when None.

    Raises:
        ValueError: a wanted module matches nothing or several, a layer lacks one shaped like
            layer 0's, or there is nothing to adapt.
    """
    first = linear_targets(layers[0])
    first_experts = find_experts(layers[0])
    if wanted is None:
        names, paths = list(first), list(first_experts)
    else:
        names, paths = [], []
        for want in wanted:
            found = [n for n in first if n == want or n.endswith("." + want)]
            found_experts = [p for p in first_experts if p == want or p.endswith("." + want)]
            if len(found) + len(found_experts) != 1:
                raise ValueError(
                    f"target module {want!r} matches {found + found_experts or 'nothing'} in "
                    f"a decoder layer (linears: {', '.join(first)}; experts modules: "
                    f"{', '.join(first_experts) or 'none'})"
                )
            names.extend(found)
            paths.extend(found_experts)
    if not names and not paths:
        raise ValueError("the decoder layers have no linear modules to adapt")
    num_layers = len(layers)
    targets: dict[str, tuple[TargetModule, torch.Tensor]] = {}
    for name in names:
        base = first[name]
        for index, layer in enumerate(layers):
            other = linear_targets(layer).get(name)
            if other is None or other.weight.shape != base.weight.shape:
                raise ValueError(f"layer {index} has no linear {name!r} shaped like layer 0's")
        target = TargetModule(name, base.in_features, base.out_features, num_layers)
        targets[name] = (target, base.weight)
    experts: dict[str, ExpertsTarget] = {}
    for path in paths:
        target_experts = first_experts[path]
        for index, layer in enumerate(layers):
            if find_experts(layer).get(path) != target_experts:
                raise ValueError(
                    f"layer {index} has no experts module {path!r} shaped like layer 0's"
                )
        experts[path] = target_experts
        weight = layers[0].get_submodule(path).get_parameter("gate_up_proj")
        for projection in PROJECTIONS:
            name = target_experts.slot_module(projection)
            in_features, out_features = target_experts.features(projection)
            slot_target = TargetModule(
                name, in_features, out_features, num_layers, target_experts.num_experts
            )
            targets[name] = (slot_target, weight)
    return targets, experts
