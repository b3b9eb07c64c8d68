"""Import from, and export to, the PEFT adapter directory layout.

PEFT saves ``adapter_config.json`` and ``adapter_model.safetensors`` with one tensor per layer and
module (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``). Import stacks them
per module into a pack; export slices them back out under the original key names, so a round trip
is bit-exact. MoE expert LoRA comes in two PEFT layouts (one pair per expert, or PEFT's
``target_parameters`` on fused 3-D experts), both stacked to ``[L, E, r, in]`` /
``[L, E, r, out]`` (``lora_B`` rank-major, see :mod:`catalog.pack.format`) and written back
where they came from (see :mod:`catalog.pack.peft_experts`). Whatever import does not
understand (DoRA, embedding LoRA, biases, ``modules_to_save``, keys outside the decoder layers,
mixed dtypes, a missing expert) is refused by name: a pack never silently drops a weight.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from catalog.errors import InvalidPack
from catalog.pack.container import (
    TensorBytes,
    is_decimal,
    library_order,
    loads_strict_json,
    parse_safetensors,
    serialize_parts,
)
from catalog.pack.format import (
    Pack,
    PackPlan,
    TensorParts,
    lora_a_name,
    lora_b_name,
    plan_pack,
    rank_major_parts,
    read_pack,
)
from catalog.pack.manifest import (
    MAX_EXPERTS,
    MAX_LAYERS,
    PACK_DTYPES,
    ModuleSpec,
    PackManifest,
)
from catalog.pack.peft_experts import (
    BASE_LAYER,
    FUSED_PARAMETER_ORDER,
    LAYOUT_PEFT_PARAMETER,
    LAYOUT_PER_EXPERT,
    ExpertLayout,
    ParsedKey,
    TargetParameters,
    check_parameter_nesting,
    experts_a_to_peft,
    experts_b_from_peft,
    experts_b_to_peft,
    layouts_from_source,
    parse_layer_key,
)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
SOURCE_KIND_PEFT = "peft"
#: Key prefix of the decoder layers in a PEFT causal-LM adapter (Llama, Qwen2, Mistral, ...).
DEFAULT_KEY_PREFIX = "base_model.model.model.layers"
#: What PEFT puts in front of the base model's own module names.
_PEFT_MODEL_PREFIX = "base_model.model."
_PEFT_SAFETENSORS_METADATA = {"format": "pt"}
MAX_CONFIG_BYTES = 16 * 1024 * 1024
_MAX_PATTERN_LENGTH = 1024
_LORA_A_SUFFIX = ".lora_A.weight"
_LORA_B_SUFFIX = ".lora_B.weight"
_LORA_SUFFIXES = {_LORA_A_SUFFIX: "A", _LORA_B_SUFFIX: "B"}

#: Config features whose weights or semantics a pack cannot carry: refused when truthy.
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases)",
    "layer_replication": "layer_replication",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------- import


def import_peft_dir(
    path: str | os.PathLike[str],
    *,
    base_id: str | None = None,
    num_layers: int | None = None,
    num_experts: int | None = None,
) -> bytes:
    """Read a PEFT LoRA adapter directory and return the bytes of its pack.

    ``base_id`` defaults to the config's ``base_model_name_or_path``; ``num_layers`` (the base's
    layer count) to the highest adapted layer + 1; ``num_experts`` (the base's experts per MoE
    layer) to what the expert tensors show. Pass ``num_experts`` for a per-expert adapter: only
    then can import tell that the last experts are missing everywhere.

    Raises:
        InvalidPack: a file is missing or malformed, or the adapter holds anything a pack cannot
            carry (the message names the file, key or config field).
    """
    return plan_peft_dir(
        path, base_id=base_id, num_layers=num_layers, num_experts=num_experts
    ).tobytes()


def plan_peft_dir(
    path: str | os.PathLike[str],
    *,
    base_id: str | None = None,
    num_layers: int | None = None,
    num_experts: int | None = None,
) -> PackPlan:
    """As :func:`import_peft_dir`, but the pack laid out and not yet written: its parts are
    views of the adapter's weights file, mapped read-only (as the ``safetensors`` library
    reads it), written once by ``catalog.pack.aligned_writes.aligned_windows`` (into a
    catalog's push inbox, see ``CatalogClient.push_peft_dir``), :meth:`PackPlan.write_into`
    or :meth:`PackPlan.tobytes`.
    The file may be replaced meanwhile (a new file under its name), not truncated in place:
    like any mapping, a truncated one ends the process with ``SIGBUS``.

    Raises:
        InvalidPack: as :func:`import_peft_dir`.
    """
    directory = Path(path)
    if not directory.is_dir():
        _fail(f"PEFT adapter directory {str(directory)!r} does not exist")
    config_path = directory / PEFT_CONFIG_FILE
    weights_path = directory / PEFT_WEIGHTS_FILE
    if not config_path.is_file():
        _fail(f"PEFT adapter directory {str(directory)!r} has no {PEFT_CONFIG_FILE}")
    if not weights_path.is_file():
        hint = (
            " (adapter_model.bin pickles are not read)"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        _fail(f"PEFT adapter directory {str(directory)!r} has no {PEFT_WEIGHTS_FILE}{hint}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        _fail(f"{PEFT_CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    config = loads_strict_json(config_path.read_bytes(), PEFT_CONFIG_FILE)
    if not isinstance(config, dict):
        _fail(f"{PEFT_CONFIG_FILE} is not a JSON object")
    try:
        weights = parse_safetensors(_mapped(weights_path))
    except InvalidPack as exc:
        raise InvalidPack(f"{PEFT_WEIGHTS_FILE}: {exc.message}") from None
    return plan_from_peft_tensors(
        config,
        weights.tensors,
        base_id,
        num_layers=num_layers,
        num_experts=num_experts,
        metadata=weights.metadata,
    )


def _mapped(path: Path) -> memoryview:
    """The file's bytes through a read-only mapping, as the ``safetensors`` library reads
    weights: no copy into new memory (on the 2-core dev VM, laying out the rank-16 adapter
    took 12.7 ms reading its 17.6 MB, 4.3 mapping it). The mapping lives as
    long as a view of it (the plan's parts); like any mapping, it must not be truncated
    while it is read (the process would get SIGBUS)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))


def pack_from_peft_tensors(
    config: Mapping[str, Any],
    tensors: Mapping[str, TensorBytes],
    base_id: str | None,
    *,
    num_layers: int | None = None,
    num_experts: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Build a pack from a PEFT LoRA config and its state dict (PEFT key names -> tensors).

    ``metadata`` is the PEFT file's safetensors ``__metadata__`` (``{"format": "pt"}`` when not
    given), kept so export reproduces the file exactly. Expert modules are recorded in the
    manifest source under ``expert_modules`` (module -> :class:`ExpertLayout` JSON).

    Raises:
        InvalidPack: naming the config field or key that a pack cannot carry, a module whose
            rank, alpha or shape differs across layers or experts, a missing expert, mixed
            dtypes, or no base_id.
    """
    return plan_from_peft_tensors(
        config,
        tensors,
        base_id,
        num_layers=num_layers,
        num_experts=num_experts,
        metadata=metadata,
    ).tobytes()


def plan_from_peft_tensors(
    config: Mapping[str, Any],
    tensors: Mapping[str, TensorBytes],
    base_id: str | None,
    *,
    num_layers: int | None = None,
    num_experts: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> PackPlan:
    """As :func:`pack_from_peft_tensors`, the pack laid out and not yet written (its parts
    are views of ``tensors``; see :class:`PackPlan`).

    Raises:
        InvalidPack: as :func:`pack_from_peft_tensors`.
    """
    config = dict(config)
    _check_config(config)
    if base_id is None:
        base_id = config.get("base_model_name_or_path")
        if not isinstance(base_id, str) or not base_id:
            _fail(f"no base_id: pass one, or set base_model_name_or_path in {PEFT_CONFIG_FILE}")
    if num_experts is not None and (
        not _is_int(num_experts) or not 1 <= num_experts <= MAX_EXPERTS
    ):
        _fail(f"num_experts must be an integer in [1, {MAX_EXPERTS}], got {num_experts!r}")
    if not tensors:
        _fail("adapter has no LoRA weights")
    targets = TargetParameters(config, PEFT_CONFIG_FILE)
    patterns = _Patterns(config)
    prefix, groups = _group_keys(tensors, targets, patterns)
    dtype = _common_dtype(tensors)
    model_prefix = prefix.removeprefix(_PEFT_MODEL_PREFIX)
    experts = num_experts or _count_experts(groups, patterns, model_prefix)
    modules: list[ModuleSpec] = []
    parts: list[TensorParts] = []
    for name in sorted(groups):
        group = groups[name]
        stack = _STACKERS[group.layout.kind if group.layout else _DENSE]
        module, a_parts, b_parts = stack(name, group, patterns, model_prefix, experts)
        modules.append(module)
        # Stacking is concatenation: the parts are views into the PEFT file, copied once
        # when the pack is written; lora_B's are transposed as they are written (rank-major,
        # see catalog.pack.format: the engine's slot layout, so that attaching is a plain copy).
        parts.append((lora_a_name(name), dtype, module.shape_a, a_parts))
        b_stored = rank_major_parts(module, dtype, b_parts)
        parts.append((lora_b_name(name), dtype, module.shape_bt, b_stored))
    layouts = {name: g.layout for name, g in groups.items() if g.layout is not None}
    check_parameter_nesting({m.name: (m.in_features, m.out_features) for m in modules}, layouts)
    highest = max(m.layers[-1] for m in modules)
    if num_layers is None:
        num_layers = highest + 1
    source: dict[str, Any] = {
        "kind": SOURCE_KIND_PEFT,
        "adapter_config": config,
        "key_prefix": prefix,
        "safetensors_metadata": dict(metadata or _PEFT_SAFETENSORS_METADATA),
    }
    if layouts:
        source["expert_modules"] = {name: layouts[name].to_json() for name in sorted(layouts)}
    manifest = PackManifest(
        base_id=base_id,
        rank=max(m.rank for m in modules),
        alpha=config["lora_alpha"],
        dtype=dtype,
        use_rslora=bool(config.get("use_rslora", False)),
        num_layers=num_layers,
        num_experts=experts if layouts else 0,
        modules=tuple(modules),
        source=source,
    )
    return plan_pack(manifest, parts)


def _check_config(config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        _fail(f"{PEFT_CONFIG_FILE}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            _fail(f"{PEFT_CONFIG_FILE}: {feature} is not supported by the pack format")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        _fail(f"{PEFT_CONFIG_FILE}: r must be a positive integer, got {r!r}")
    if not _is_number(config.get("lora_alpha")):
        _fail(f"{PEFT_CONFIG_FILE}: lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        _fail(f"{PEFT_CONFIG_FILE}: use_rslora must be a boolean")


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


_DENSE = "dense"


@dataclass
class _Group:
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


def _group_keys(
    tensors: Mapping[str, TensorBytes], targets: TargetParameters, patterns: _Patterns
) -> tuple[str, dict[str, _Group]]:
    """Split PEFT keys into (layer prefix, {pack module: its tensors}).

    Every key gets every check, but what repeats across a file's keys is worked out once
    (this was ~1.3 ms of the 3.5 ms plan of a 336-tensor file): a key under the prefix
    already found splits at its layer index without a search (:func:`_split_key` does the
    search for any other key, and judges it); a layer index is checked once per layer; and
    with no ``target_parameters`` in the config, :func:`parse_layer_key` depends on nothing
    but the path inside the layer (the same 14 paths in every layer of a dense adapter), so
    its answer for a path is kept.
    """
    prefix: str | None = None
    lead = ""  # prefix + "." once the prefix is known
    groups: dict[str, _Group] = {}
    layers: dict[str, tuple[int, str]] = {}  # layer index text -> (layer, its layer key)
    parsed_paths: dict[str, ParsedKey] | None = None if targets.targets else {}
    _refuse_non_lora_keys(list(tensors))
    for key, tensor in tensors.items():
        side = "A" if key.endswith(_LORA_A_SUFFIX) else "B"
        stem = key[: -len(_LORA_A_SUFFIX if side == "A" else _LORA_B_SUFFIX)]
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
                f"{lead[:-1].removeprefix(_PEFT_MODEL_PREFIX)}.{int(layer_text)}",
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
            group = groups[parsed.module] = _Group(parsed.layout)
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


def _common_dtype(tensors: Mapping[str, TensorBytes]) -> str:
    first_key, first = next(iter(tensors.items()))
    for key, tensor in tensors.items():
        if tensor.dtype != first.dtype:
            _fail(f"mixed dtypes: {key!r} is {tensor.dtype} but {first_key!r} is {first.dtype}")
    if first.dtype not in PACK_DTYPES:
        _fail(f"dtype {first.dtype} of {first_key!r} is not one of {', '.join(PACK_DTYPES)}")
    return first.dtype


class _Patterns:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup, as ``peft.utils.get_pattern_key``
    does it: the first pattern P (in file order) with ``re.match(rf"(.*\\.)?({P})$", key)``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.r: int = config["r"]
        self.alpha: float = float(config["lora_alpha"])
        self.ranks = self._compile(config, "rank_pattern", _is_int)
        self.alphas = self._compile(config, "alpha_pattern", _is_number)
        #: No patterns: every key's rank is ``r`` and its alpha ``lora_alpha``.
        self.uniform = not self.ranks and not self.alphas

    @staticmethod
    def _compile(
        config: Mapping[str, Any], field: str, valid: Any
    ) -> list[tuple[re.Pattern[str], Any]]:
        table = config.get(field) or {}
        if not isinstance(table, dict):
            _fail(f"{PEFT_CONFIG_FILE}: {field} must be a JSON object")
        compiled = []
        for pattern, value in table.items():
            if len(pattern) > _MAX_PATTERN_LENGTH or not valid(value):
                _fail(f"{PEFT_CONFIG_FILE}: {field} entry {pattern!r}: {value!r} is invalid")
            try:
                compiled.append((re.compile(rf"(.*\.)?({pattern})$"), value))
            except re.error as exc:
                raise InvalidPack(
                    f"{PEFT_CONFIG_FILE}: {field} pattern {pattern!r} is not a regex: {exc}"
                ) from None
        return compiled

    @staticmethod
    def _lookup(table: list[tuple[re.Pattern[str], Any]], key: str, default: Any) -> Any:
        for regex, value in table:
            if regex.match(key):
                return value
        return default

    def rank(self, key: str) -> int:
        return int(self._lookup(self.ranks, key, self.r))

    def alpha_of(self, key: str) -> float:
        return float(self._lookup(self.alphas, key, self.alpha))


#: Stacks one module: (name, group, patterns, model prefix, experts) ->
#: (spec, lora_A byte parts, lora_B byte parts).
_Stacker = Callable[
    [str, _Group, _Patterns, str, int],
    tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]],
]


class _ModuleChecker:
    """Checks that every LoRA pair of one module agrees on shapes, rank and alpha."""

    def __init__(self, name: str, patterns: _Patterns) -> None:
        self.name = name
        self.patterns = patterns
        self.first: tuple[str, tuple[int, ...], tuple[int, ...], float] | None = None

    def check(
        self,
        where: str,
        pattern_key: str,
        shape_a: tuple[int, ...],
        shape_b: tuple[int, ...],
        rank: int,
    ) -> float:
        """Check one pair (``where`` names it in messages); returns its alpha."""
        expected_rank = self.patterns.rank(pattern_key)
        alpha = self.patterns.alpha_of(pattern_key)
        if self.first is None:
            self.first = (where, shape_a, shape_b, alpha)
        first_where, first_a, first_b, first_alpha = self.first
        if shape_a != first_a or shape_b != first_b:
            _fail(
                f"module {self.name!r} {where}: lora_A {list(shape_a)} / lora_B {list(shape_b)} "
                f"differ from {first_where}'s {list(first_a)} / {list(first_b)}; "
                f"a pack holds one rank and shape per module"
            )
        if expected_rank != rank:
            _fail(
                f"module {self.name!r} {where}: tensors have rank {rank} but "
                f"{PEFT_CONFIG_FILE} says {expected_rank}"
            )
        if alpha != first_alpha:
            _fail(
                f"module {self.name!r} {where}: lora_alpha {alpha} differs from "
                f"{first_where}'s {first_alpha}; a pack holds one alpha per module"
            )
        return alpha


def _stack_dense(
    name: str, group: _Group, patterns: _Patterns, model_prefix: str, experts: int
) -> tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]]:
    layers = tuple(sorted(group.tensors))
    pairs = [group.tensors[layer][None] for layer in layers]
    first_a, first_b = pairs[0]["A"], pairs[0]["B"]
    if len(first_a.shape) != 2 or len(first_b.shape) != 2:
        _fail(f"module {name!r}: lora_A/lora_B must be 2-D, got {first_a.shape}, {first_b.shape}")
    checker = _ModuleChecker(name, patterns)
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
    name: str, group: _Group, patterns: _Patterns, model_prefix: str, experts: int
) -> tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]]:
    assert group.layout is not None
    layers = tuple(sorted(group.tensors))
    checker = _ModuleChecker(name, patterns)
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
    name: str, group: _Group, patterns: _Patterns, model_prefix: str, experts: int
) -> tuple[ModuleSpec, list[bytes | memoryview], list[bytes | memoryview]]:
    layers = tuple(sorted(group.tensors))
    checker = _ModuleChecker(name, patterns)
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


def _count_experts(groups: Mapping[str, _Group], patterns: _Patterns, model_prefix: str) -> int:
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


# ---------------------------------------------------------------- export


def export_peft_dir(
    pack: Pack | bytes | bytearray | memoryview,
    dest: str | os.PathLike[str],
    *,
    fsync: bool = True,
) -> None:
    """Write ``pack`` as a PEFT adapter directory (created if missing).

    A pack imported from PEFT gets its original config and key names back, byte for byte,
    expert modules in the layout they came in; any other pack gets a synthesized LoRA config
    (expert modules only when they name a fused parameter, written as PEFT's
    ``target_parameters``). Each file is written to a temporary name and renamed into place,
    fsynced first unless ``fsync`` is False (for a caller whose copy need not survive a power
    loss, such as a node-local cache on an ephemeral disk).

    Raises:
        InvalidPack: ``pack`` bytes are invalid, or its expert modules have no PEFT layout
            (recorded or synthesizable).
    """
    if not isinstance(pack, Pack):
        pack = read_pack(pack)
    manifest = pack.manifest
    source = manifest.source
    config = source.get("adapter_config")
    prefix = source.get("key_prefix")
    metadata = source.get("safetensors_metadata")
    from_peft = (
        source.get("kind") == SOURCE_KIND_PEFT
        and isinstance(config, dict)
        and isinstance(prefix, str)
        and bool(prefix)
    )
    layout_at: Callable[[ModuleSpec, int], ExpertLayout | None]
    if from_peft:
        layout_at = _recorded_layouts(manifest)
    else:
        layout_at = _synthesized_layouts(manifest)
        config = synthesize_peft_config(manifest)
        prefix = DEFAULT_KEY_PREFIX
    assert isinstance(config, dict) and isinstance(prefix, str)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        metadata = _PEFT_SAFETENSORS_METADATA
    tensors: dict[str, TensorBytes] = {}
    for module in manifest.modules:
        stacked_a, stacked_b = pack.module_tensors(module.name)
        for i, layer in enumerate(module.layers):
            a, b = stacked_a.index(i), stacked_b.index(i)
            layout = layout_at(module, layer)
            if layout is None:
                pairs = [(module.name, a, b)]
            elif layout.kind == LAYOUT_PER_EXPERT:
                pairs = [
                    (layout.key_module_of(e), a.index(e), b.index(e))
                    for e in range(module.num_experts)
                ]
            else:
                pairs = [(layout.key_module, experts_a_to_peft(a), experts_b_to_peft(b))]
            for path, lora_a, lora_b in pairs:
                tensors[f"{prefix}.{layer}.{path}.lora_A.weight"] = lora_a
                tensors[f"{prefix}.{layer}.{path}.lora_B.weight"] = lora_b
    weights = serialize_parts(metadata, library_order(tensors))
    config_text = json.dumps(config, indent=2, sort_keys=True).encode()
    directory = Path(dest)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / PEFT_WEIGHTS_FILE, weights, fsync=fsync)
    write_atomically(directory / PEFT_CONFIG_FILE, config_text, fsync=fsync)


def _recorded_layouts(manifest: PackManifest) -> Callable[[ModuleSpec, int], ExpertLayout | None]:
    """The expert layouts a PEFT import recorded, checked against the manifest's modules."""
    layouts = layouts_from_source(manifest.source)
    for name in layouts:
        if name not in manifest.target_modules:
            _fail(f"manifest source names expert module {name!r} that the pack does not have")
    for module in manifest.modules:
        if bool(module.num_experts) != (module.name in layouts):
            _fail(
                f"module {module.name!r} has {module.num_experts} experts but the manifest "
                f"source {'records' if module.name in layouts else 'lacks'} an expert layout"
            )
    return lambda module, layer: layouts.get(module.name)


def _synthesized_layouts(
    manifest: PackManifest,
) -> Callable[[ModuleSpec, int], ExpertLayout | None]:
    """Where PEFT's ``target_parameters`` put each fused expert parameter's LoRA, layer by
    layer: PEFT nests the parameters of one module in registration order, the last outermost.

    Raises:
        InvalidPack: an expert module names no fused parameter.
    """
    fused = {m.name: _fused_parameter(m) for m in manifest.modules if m.num_experts}

    def layout_at(module: ModuleSpec, layer: int) -> ExpertLayout | None:
        if module.name not in fused:
            return None
        owner, parameter = fused[module.name]
        nested = sorted(
            (
                p
                for name, (o, p) in fused.items()
                if o == owner and layer in manifest.module(name).layers
            ),
            key=FUSED_PARAMETER_ORDER.index,
        )
        depth = len(nested) - 1 - nested.index(parameter)
        return ExpertLayout(LAYOUT_PEFT_PARAMETER, ".".join([owner, *[BASE_LAYER] * depth]))

    return layout_at


def _fused_parameter(module: ModuleSpec) -> tuple[str, str]:
    """(owner module, parameter) of an expert module that names a fused 3-D parameter.

    Raises:
        InvalidPack: the name is not a known fused parameter (no PEFT layout can be inferred).
    """
    owner, _, parameter = module.name.rpartition(".")
    if not owner or parameter not in FUSED_PARAMETER_ORDER:
        _fail(
            f"module {module.name!r} has experts but the pack records no PEFT key layout for "
            f"it, and it names no fused parameter ({', '.join(FUSED_PARAMETER_ORDER)})"
        )
    return owner, parameter


def synthesize_peft_config(manifest: PackManifest) -> dict[str, Any]:
    """A PEFT LoRA config that makes PEFT rebuild exactly the modules, layers, ranks and alphas
    of ``manifest`` on a causal LM whose decoder layers are ``model.layers``. Expert modules
    become ``target_parameters`` (they must name fused parameters such as
    ``mlp.experts.gate_up_proj``).

    Raises:
        InvalidPack: an expert module names no fused parameter.
    """
    model_prefix = DEFAULT_KEY_PREFIX.removeprefix(_PEFT_MODEL_PREFIX)
    experts = [m for m in manifest.modules if m.num_experts]
    for module in experts:
        _fused_parameter(module)
    layer_sets = {m.layers for m in manifest.modules}
    every_layer = tuple(range(manifest.num_layers))
    layers_to_transform: list[int] | None = None
    names: dict[str, list[str]]
    # PEFT applies layers_to_transform to target_modules only, never to target_parameters.
    if len(layer_sets) == 1 and (not experts or layer_sets == {every_layer}):
        # Module names match as suffixes of PEFT's keys; one shared layer subset fits
        # layers_to_transform.
        names = {m.name: [m.name] for m in manifest.modules}
        (layers,) = layer_sets
        if layers != every_layer:
            layers_to_transform = list(layers)
    else:
        names = {
            m.name: [f"{model_prefix}.{layer}.{m.name}" for layer in m.layers]
            for m in manifest.modules
        }
    target_modules = [n for m in manifest.modules if not m.num_experts for n in names[m.name]]
    alpha: float | int = int(manifest.alpha) if manifest.alpha.is_integer() else manifest.alpha
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": manifest.base_id,
        "r": manifest.rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "rank_pattern": {
            re.escape(m.name): m.rank for m in manifest.modules if m.rank != manifest.rank
        },
        "alpha_pattern": {
            re.escape(m.name): m.alpha for m in manifest.modules if m.alpha != manifest.alpha
        },
        "use_rslora": manifest.use_rslora,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if experts:
        config["target_parameters"] = [n for m in experts for n in names[m.name]]
    return config


def write_atomically(
    path: Path, data: bytes | Sequence[bytes | memoryview], *, fsync: bool = True
) -> None:
    """Write ``data`` (bytes, or chunks written in order) to a temporary file beside ``path``,
    fsync it (unless ``fsync`` is False), and rename it into place."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the adapter from other readers
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                handle.writelines(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
