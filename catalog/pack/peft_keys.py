"""Grouping a PEFT state dict's keys into a pack's modules.

Every key must be a ``lora_A``/``lora_B`` weight of a module inside one stack of decoder layers
(``{prefix}.{layer}.{path}.lora_A.weight``); anything else (DoRA magnitudes, embedding LoRA,
biases, saved base layers, keys outside the layers) is refused by name, never dropped.
:func:`group_keys` splits each key at its layer index, asks :mod:`catalog.pack.peft_experts`
which pack module (and expert) its path belongs to, and checks that every ``lora_A`` has its
``lora_B``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn

from catalog.errors import InvalidPack
from catalog.pack.container import TensorBytes, is_decimal
from catalog.pack.manifest import MAX_LAYERS
from catalog.pack.peft_checks import PeftPatterns
from catalog.pack.peft_experts import (
    ExpertLayout,
    ParsedKey,
    TargetParameters,
    parse_layer_key,
)
from catalog.pack.peft_files import LORA_A_SUFFIX, LORA_B_SUFFIX, PEFT_MODEL_PREFIX

_LORA_SUFFIXES = {LORA_A_SUFFIX: "A", LORA_B_SUFFIX: "B"}


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


_KEY_PROBLEMS = (
    ("lora_magnitude_vector", "DoRA magnitude vectors are not supported"),
    ("lora_embedding_", "embedding LoRA is not supported"),
    (".bias", "bias tensors are not supported"),
    (".base_layer.", "full base-layer weights (e.g. saved embedding layers) are not supported"),
)


def _refuse_non_lora_keys(keys: list[str]) -> None:
    """Refuse every key that is not a LoRA A/B weight, naming the most telling one first."""
    suffixes = tuple(_LORA_SUFFIXES)
    bad = [key for key in keys if not key.endswith(suffixes)]
    for marker, problem in _KEY_PROBLEMS:
        for key in bad:
            if marker in key:
                _fail(f"unsupported key {key!r}: {problem}")
    if bad:
        _fail(f"unsupported key {bad[0]!r}: not a lora_A/lora_B weight of a decoder-layer module")


@dataclass
class ModuleGroup:
    """The PEFT tensors of one pack module: ``{layer: {expert: {"A"|"B": tensor}}}``, where the
    expert is ``None`` unless the layout is per-expert."""

    layout: ExpertLayout | None
    tensors: dict[int, dict[int | None, dict[str, TensorBytes]]] = field(default_factory=dict)

    def key(self, prefix: str, name: str, layer: int, expert: int | None, side: str) -> str:
        """The PEFT key a tensor of this module had."""
        path = self.layout.key_module_of(expert) if self.layout else name
        return f"{prefix}.{layer}.{path}.lora_{side}.weight"


def _describe(layout: ExpertLayout | None) -> str:
    return "a dense module" if layout is None else f"{layout.kind} under {layout.key_module!r}"


def _split_key(key: str, stem: str) -> tuple[str, str, str]:
    """(prefix, layer index text, path inside the layer) of ``stem``, ``key`` without its
    lora suffix: the layer index is its first all-digit part.

    Raises:
        InvalidPack: no such part, or nothing before or after it.
    """
    parts = stem.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if index is None or index == 0 or index == len(parts) - 1:
        _fail(f"unsupported key {key!r}: outside the decoder layers")
    return ".".join(parts[:index]), parts[index], ".".join(parts[index + 1 :])


def _check_layer_index(key: str, text: str) -> None:
    """Raises: InvalidPack when ``text``, ``key``'s layer index, is not canonical."""
    if not is_decimal(text) or int(text) >= MAX_LAYERS:
        _fail(f"unsupported key {key!r}: layer index {text!r} is not canonical")


def group_keys(
    tensors: Mapping[str, TensorBytes], targets: TargetParameters, patterns: PeftPatterns
) -> tuple[str, dict[str, ModuleGroup]]:
    """Split PEFT keys into (layer prefix, {pack module: its tensors}).

    Every key gets every check, but what repeats across a file's keys is worked out once
    (this was ~1.3 ms of the 3.5 ms plan of a 336-tensor file): a key under the prefix
    already found splits at its layer index without a search (:func:`_split_key` does the
    search for any other key, and judges it); a layer index is checked once per layer; and
    with no ``target_parameters`` in the config, :func:`parse_layer_key` depends on nothing
    but the path inside the layer (the same 14 paths in every layer of a dense adapter), so
    its answer for a path is kept.

    Raises:
        InvalidPack: a key that is not a LoRA weight of a decoder-layer module (named), layers
            under two prefixes, a non-canonical layer index, a module saved in two layouts, or
            a lora_A without its lora_B (or the reverse).
    """
    prefix: str | None = None
    lead = ""  # prefix + "." once the prefix is known
    groups: dict[str, ModuleGroup] = {}
    layers: dict[str, tuple[int, str]] = {}  # layer index text -> (layer, its layer key)
    parsed_paths: dict[str, ParsedKey] | None = None if targets.targets else {}
    _refuse_non_lora_keys(list(tensors))
    for key, tensor in tensors.items():
        side = "A" if key.endswith(LORA_A_SUFFIX) else "B"
        stem = key[: -len(LORA_A_SUFFIX if side == "A" else LORA_B_SUFFIX)]
        layer_text = path = ""
        if lead and stem.startswith(lead):
            # The prefix holds no all-digit part (it is what came before the first one), so
            # the first all-digit part of this key is the first part after it, if any.
            layer_text, dot, path = stem[len(lead) :].partition(".")
            if not (dot and layer_text.isdigit()):
                layer_text = ""
        if not layer_text:
            key_prefix, layer_text, path = _split_key(key, stem)
            _check_layer_index(key, layer_text)
            if prefix is None:
                prefix, lead = key_prefix, key_prefix + "."
            elif key_prefix != prefix:
                _fail(
                    f"unsupported key {key!r}: its layers live under {key_prefix!r} but other "
                    f"keys under {prefix!r}; a pack holds one stack of decoder layers"
                )
        known = layers.get(layer_text)
        if known is None:
            _check_layer_index(key, layer_text)
            known = layers[layer_text] = (
                int(layer_text),
                f"{lead[:-1].removeprefix(PEFT_MODEL_PREFIX)}.{int(layer_text)}",
            )
        layer, layer_key = known
        parsed = parsed_paths.get(path) if parsed_paths is not None else None
        if parsed is None:
            width = (tensor.shape[0] if side == "A" else tensor.shape[-1]) if tensor.shape else 0
            rest = path.split(".")
            parsed = parse_layer_key(key, rest, layer_key, targets, width, patterns.rank)
            if parsed_paths is not None:
                parsed_paths[path] = parsed
        group = groups.get(parsed.module)
        if group is None:
            group = groups[parsed.module] = ModuleGroup(parsed.layout)
        elif group.layout != parsed.layout:
            _fail(
                f"unsupported key {key!r}: module {parsed.module!r} is saved as "
                f"{_describe(parsed.layout)} here but as {_describe(group.layout)} elsewhere; "
                "a pack records one layout per module"
            )
        group.tensors.setdefault(layer, {}).setdefault(parsed.expert, {})[side] = tensor
    assert prefix is not None  # tensors was checked non-empty
    for name, group in groups.items():
        for layer, by_expert in group.tensors.items():
            for expert, pair in by_expert.items():
                for side, other in (("A", "B"), ("B", "A")):
                    if side not in pair:
                        _fail(
                            f"key {group.key(prefix, name, layer, expert, other)} has no "
                            f"matching lora_{side}.weight"
                        )
    return prefix, groups
