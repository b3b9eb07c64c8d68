"""The two PEFT layouts of MoE expert LoRA, and how each maps to a pack's stacked experts.

A pack holds every expert projection as ``lora_A [L, E, r, in]`` and ``lora_B [L, E, out, r]``
(in PEFT's orientation, as this module converts it; pack format 2 stores it rank-major,
``[L, E, r, out]``, see :mod:`catalog.pack.format`), where ``in``/``out`` are the projection's
real input/output features and the delta that expert ``e`` adds to its projection of ``x`` is
``scaling * x @ A[l, e].T @ B[l, e].T``, whatever the source layout or however the base stores
its expert weights. PEFT writes expert LoRA in two ways:

``per_expert``
    One LoRA pair per expert and projection on ``nn.Linear`` experts, as transformers 4 models,
    older checkpoints and vLLM's expert layout have it:
    ``...layers.3.block_sparse_moe.experts.5.w1.lora_A.weight`` (Mixtral) or
    ``...layers.3.mlp.experts.5.gate_proj.lora_A.weight`` (Qwen2-MoE, OLMoE). The pack module is
    the path without the expert index (``block_sparse_moe.experts.w1``); stacking is byte
    concatenation in (layer, expert) order.

``peft_parameter``
    ``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])`` on a
    transformers 5 model whose experts are fused 3-D parameters. PEFT's ``lora.ParamWrapper``
    keeps one ``nn.Linear`` pair per parameter: ``lora_A`` ``(E*r, in)`` (expert-major rows:
    ``A_e = A[e*r:(e+1)*r]``) and ``lora_B`` ``(out, r*E)`` (rank-major columns:
    ``B_e[:, j] = B[:, j*E + e]``, PEFT's ``B.reshape(out, r, E)``). Both parameters of one
    experts module are wrapped by nested wrappers, so their keys name the module, not the
    parameter: the parameter registered last in the base module is outermost
    (``...mlp.experts.lora_A.weight`` is ``down_proj``), each earlier one is one ``base_layer``
    deeper (``...mlp.experts.base_layer.lora_A.weight`` is ``gate_up_proj``). The pack module is
    the parameter path (``mlp.experts.gate_up_proj``); ``A`` stacks by concatenation, ``B`` by
    one transposition per layer. PEFT normalises both storage orders of fused experts
    (``[E, out, in]`` as Mixtral and Qwen-MoE keep them, ``[E, in, out]`` where the experts are
    ``is_transposed`` as in GPT-OSS), so the pack's ``in``/``out`` never depend on them; an
    engine applying the pack reads the base's own order. A fused ``gate_up_proj`` stays one
    module whose ``out`` is ``2 * intermediate``: its rows are the base's own fused rows.

The layout of each expert module is recorded in the manifest source (``expert_modules``) so that
export writes every key back where PEFT had it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from catalog.errors import InvalidPack
from catalog.pack.container import TensorBytes, is_decimal
from catalog.pack.format import UNSIGNED_BY_ITEMSIZE
from catalog.pack.manifest import MAX_EXPERTS

#: ``kind`` of an expert module imported from one LoRA pair per expert and projection.
LAYOUT_PER_EXPERT = "per_expert"
#: ``kind`` of an expert module imported from PEFT ``target_parameters`` on fused experts.
LAYOUT_PEFT_PARAMETER = "peft_parameter"
#: Where the expert index goes in a per-expert key template.
EXPERT_PLACEHOLDER = "{expert}"
#: PEFT nests one ``base_layer`` level per parameter wrapped before this one.
BASE_LAYER = "base_layer"
#: How PEFT orders the columns of a fused ``lora_B``: column ``j * E + e`` is rank ``j`` of
#: expert ``e``.
LORA_B_COLUMNS_RANK_MAJOR = "rank_major"

#: The order in which transformers 5 expert modules register their fused 3-D parameters (every
#: MoE model there registers ``gate_up_proj`` or ``up_proj`` before ``down_proj``). PEFT wraps
#: them in registration order, so this order decides which key depth holds which parameter.
FUSED_PARAMETER_ORDER = ("gate_up_proj", "up_proj", "down_proj")
#: Parameters that take the model's hidden state as input, paired with the ``down_proj`` that
#: returns to it: for both, ``in(first) == out(down_proj)``, which checks the nesting order.
_INPUT_PARAMETERS = ("gate_up_proj", "up_proj")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


@dataclass(frozen=True)
class ExpertLayout:
    """Where a pack's expert module lives in a PEFT state dict.

    ``key_module`` is the key path inside a decoder layer: ``mlp.experts.{expert}.gate_proj``
    for ``per_expert``, ``mlp.experts.base_layer`` for ``peft_parameter``.

    Raises:
        InvalidPack: an unknown kind or a key path that does not fit it.
    """

    kind: str
    key_module: str

    def __post_init__(self) -> None:
        parts = self.key_module.split(".") if isinstance(self.key_module, str) else []
        placeholders = parts.count(EXPERT_PLACEHOLDER)
        named = [p for p in parts if p != EXPERT_PLACEHOLDER]
        if not parts or not all(_IDENTIFIER.fullmatch(p) for p in named):
            _fail(f"expert key path {self.key_module!r} is not a dotted identifier path")
        if self.kind == LAYOUT_PER_EXPERT:
            if placeholders != 1 or parts[0] == EXPERT_PLACEHOLDER:
                _fail(
                    f"per-expert key path {self.key_module!r} needs one {EXPERT_PLACEHOLDER} "
                    "part after the module"
                )
        elif self.kind == LAYOUT_PEFT_PARAMETER:
            if placeholders or parts[0] == BASE_LAYER:
                _fail(f"PEFT parameter key path {self.key_module!r} is not a module path")
        else:
            _fail(f"unknown expert layout {self.kind!r}")

    def key_module_of(self, expert: int | None) -> str:
        """The key path inside a layer, for ``expert`` in a per-expert layout."""
        if self.kind == LAYOUT_PER_EXPERT:
            return self.key_module.replace(EXPERT_PLACEHOLDER, str(expert))
        return self.key_module

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "key_module": self.key_module}
        if self.kind == LAYOUT_PEFT_PARAMETER:
            d["lora_b_columns"] = LORA_B_COLUMNS_RANK_MAJOR
        return d

    @classmethod
    def from_json(cls, module: str, d: object) -> ExpertLayout:
        """Raises: InvalidPack when ``d`` is not a layout :meth:`to_json` writes."""
        if not isinstance(d, dict):
            _fail(f"expert layout of module {module!r} is not a JSON object")
        kind, key_module = d.get("kind"), d.get("key_module")
        if not isinstance(kind, str) or not isinstance(key_module, str):
            _fail(f"expert layout of module {module!r} needs string kind and key_module")
        layout = cls(kind, key_module)
        if d != layout.to_json():
            _fail(f"expert layout of module {module!r} has unknown or contradicting fields")
        return layout


@dataclass(frozen=True)
class ParsedKey:
    """What one PEFT key names inside a decoder layer: the pack module, its layout (``None``
    for a dense module) and the expert (per-expert layout only)."""

    module: str
    layout: ExpertLayout | None
    expert: int | None


class TargetParameters:
    """``target_parameters`` of a PEFT config, matched the way PEFT matches them."""

    def __init__(self, config: Mapping[str, Any], config_file: str) -> None:
        targets = config.get("target_parameters") or []
        if not isinstance(targets, list) or not all(
            isinstance(t, str) and t and len(t) <= 1024 for t in targets
        ):
            _fail(f"{config_file}: target_parameters must be a list of parameter names")
        self.targets: tuple[str, ...] = tuple(targets)

    def on_module(self, module_key: str) -> list[str]:
        """The parameter names targeted on the module whose full key is ``module_key``
        (``model.layers.3.mlp.experts``), innermost wrapper first."""
        names: list[str] = []
        for target in self.targets:
            name = target.rpartition(".")[2]
            full = f"{module_key}.{name}"
            if (full == target or full.endswith(f".{target}")) and name not in names:
                names.append(name)
        order = {name: i for i, name in enumerate(FUSED_PARAMETER_ORDER)}
        return sorted(names, key=lambda name: order.get(name, len(order)))


def parse_layer_key(
    key: str,
    rest: Sequence[str],
    layer_key: str,
    targets: TargetParameters,
    width: int,
    rank_of: Callable[[str], int],
) -> ParsedKey:
    """Classify ``rest``, the key's path inside its decoder layer.

    ``layer_key`` is the layer's module name in the base model (``model.layers.3``), which PEFT
    matches targets and patterns against; ``width`` the tensor's rank axis (rows of ``lora_A``,
    columns of ``lora_B``); ``rank_of`` the configured rank of a full parameter key. A module
    key that a ``target_parameters`` entry names but whose width is one rank is a dense module:
    a 2-D parameter wrapped by PEFT has exactly the LoRA of the linear layer holding it.

    Raises:
        InvalidPack: naming ``key`` when it fits no layout a pack can carry back.
    """
    indices = [i for i, part in enumerate(rest) if part.isdigit()]
    if BASE_LAYER in rest:
        return _parse_parameter_key(key, rest, layer_key, targets)
    if not indices:
        names = targets.on_module(f"{layer_key}.{'.'.join(rest)}")
        outermost = f"{layer_key}.{'.'.join(rest)}.{names[-1]}" if names else ""
        if names and width != rank_of(outermost):
            return _parse_parameter_key(key, rest, layer_key, targets)
        return ParsedKey(".".join(rest), None, None)
    if len(indices) > 1:
        _fail(f"unsupported key {key!r}: more than one index inside the layer")
    (index,) = indices
    if index == 0 or index == len(rest) - 1:
        _fail(f"unsupported key {key!r}: an expert index must sit between module names")
    text = rest[index]
    if not is_decimal(text) or int(text) >= MAX_EXPERTS:
        _fail(f"unsupported key {key!r}: expert index {text!r} is not canonical")
    template = [*rest[:index], EXPERT_PLACEHOLDER, *rest[index + 1 :]]
    module = ".".join([*rest[:index], *rest[index + 1 :]])
    return ParsedKey(module, ExpertLayout(LAYOUT_PER_EXPERT, ".".join(template)), int(text))


def _parse_parameter_key(
    key: str, rest: Sequence[str], layer_key: str, targets: TargetParameters
) -> ParsedKey:
    depth = 0
    while depth < len(rest) and rest[len(rest) - 1 - depth] == BASE_LAYER:
        depth += 1
    path = list(rest[: len(rest) - depth])
    if not path or BASE_LAYER in path or any(p.isdigit() for p in path):
        _fail(f"unsupported key {key!r}: a base_layer level outside a parameter-LoRA module")
    names = targets.on_module(f"{layer_key}.{'.'.join(path)}")
    if not names:
        _fail(
            f"unsupported key {key!r}: base_layer levels but no target_parameters entry "
            f"names a parameter of {'.'.join(path)!r}"
        )
    if depth >= len(names):
        _fail(
            f"unsupported key {key!r}: {depth} base_layer levels but target_parameters name "
            f"only {names} on {'.'.join(path)!r}"
        )
    unknown = [n for n in names if n not in FUSED_PARAMETER_ORDER]
    if len(names) > 1 and unknown:
        _fail(
            f"unsupported key {key!r}: cannot tell how PEFT nested parameters {names} of "
            f"{'.'.join(path)!r} ({unknown} not in the known order {list(FUSED_PARAMETER_ORDER)})"
        )
    parameter = names[len(names) - 1 - depth]
    layout = ExpertLayout(LAYOUT_PEFT_PARAMETER, ".".join(rest))
    return ParsedKey(".".join([*path, parameter]), layout, None)


def check_parameter_nesting(
    specs: Mapping[str, tuple[int, int]], layouts: Mapping[str, ExpertLayout]
) -> None:
    """Check the nesting order against shapes: an input-side parameter (``gate_up_proj``,
    ``up_proj``) reads the hidden state that ``down_proj`` of the same module writes.

    ``specs`` maps module name to ``(in_features, out_features)``.

    Raises:
        InvalidPack: the shapes say the keys hold other parameters than the nesting order says.
    """
    for name, layout in layouts.items():
        if layout.kind != LAYOUT_PEFT_PARAMETER or not name.endswith(".down_proj"):
            continue
        owner = name.removesuffix(".down_proj")
        for first in _INPUT_PARAMETERS:
            other = f"{owner}.{first}"
            if other in specs and specs[other][0] != specs[name][1]:
                _fail(
                    f"module {other!r} reads {specs[other][0]} features but {name!r} writes "
                    f"{specs[name][1]}: the keys do not hold the parameters PEFT's nesting "
                    f"order {list(FUSED_PARAMETER_ORDER)} implies"
                )


def _transpose(data: memoryview, itemsize: int, shape: Sequence[int], axes: Sequence[int]) -> bytes:
    """Bit-exact transposition of raw elements (moved as unsigned integers, never as floats)."""
    array = np.frombuffer(data, dtype=UNSIGNED_BY_ITEMSIZE[itemsize]).reshape(tuple(shape))
    return np.ascontiguousarray(array.transpose(tuple(axes))).tobytes()


def experts_b_from_peft(b: TensorBytes, num_experts: int) -> bytes:
    """PEFT's fused ``lora_B`` ``(out, r*E)`` as the pack's ``[E, out, r]`` bytes."""
    out, columns = b.shape
    rank = columns // num_experts
    return _transpose(b.data, b.itemsize, (out, rank, num_experts), (2, 0, 1))


def experts_b_to_peft(b: TensorBytes) -> TensorBytes:
    """The pack's ``[E, out, r]`` (one layer) back as PEFT's fused ``lora_B`` ``(out, r*E)``."""
    num_experts, out, rank = b.shape
    data = _transpose(b.data, b.itemsize, b.shape, (1, 2, 0))
    return TensorBytes(b.dtype, (out, rank * num_experts), memoryview(data))


def experts_a_to_peft(a: TensorBytes) -> TensorBytes:
    """The pack's ``[E, r, in]`` (one layer) as PEFT's fused ``lora_A`` ``(E*r, in)``: the same
    bytes under another shape."""
    num_experts, rank, in_features = a.shape
    return TensorBytes(a.dtype, (num_experts * rank, in_features), a.data)


def layouts_from_source(source: Mapping[str, Any]) -> dict[str, ExpertLayout]:
    """The ``expert_modules`` table of a manifest source (empty for a dense pack).

    Raises:
        InvalidPack: the table is malformed.
    """
    table = source.get("expert_modules", {})
    if not isinstance(table, dict):
        _fail("manifest source expert_modules is not a JSON object")
    return {name: ExpertLayout.from_json(name, d) for name, d in table.items()}
