"""Import from, and export to, the PEFT adapter directory layout.

PEFT saves ``adapter_config.json`` and ``adapter_model.safetensors`` with one tensor per layer and
module (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``). Import stacks them
per module into a pack; export slices them back out under the original key names, so a round trip
is bit-exact. Whatever import does not understand (DoRA, embedding LoRA, biases,
``modules_to_save``, keys outside the decoder layers, mixed dtypes) is refused by name: a pack
never silently drops a weight.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
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
    TensorParts,
    assemble_pack,
    lora_a_name,
    lora_b_name,
    read_pack,
)
from catalog.pack.manifest import (
    MAX_LAYERS,
    PACK_DTYPES,
    ModuleSpec,
    PackManifest,
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
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}

#: Config features whose weights or semantics a pack cannot carry: refused when truthy.
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases)",
    "layer_replication": "layer_replication",
    "modules_to_save": "modules_to_save",
    "target_parameters": "target_parameters (parameter LoRA, e.g. fused MoE experts)",
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
    path: str | os.PathLike[str], *, base_id: str | None = None, num_layers: int | None = None
) -> bytes:
    """Read a PEFT LoRA adapter directory and return the bytes of its pack.

    ``base_id`` defaults to the config's ``base_model_name_or_path``; ``num_layers`` (the base's
    layer count) to the highest adapted layer + 1.

    Raises:
        InvalidPack: a file is missing or malformed, or the adapter holds anything a pack cannot
            carry (the message names the file, key or config field).
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
        weights = parse_safetensors(weights_path.read_bytes())
    except InvalidPack as exc:
        raise InvalidPack(f"{PEFT_WEIGHTS_FILE}: {exc.message}") from None
    return pack_from_peft_tensors(
        config, weights.tensors, base_id, num_layers=num_layers, metadata=weights.metadata
    )


def pack_from_peft_tensors(
    config: Mapping[str, Any],
    tensors: Mapping[str, TensorBytes],
    base_id: str | None,
    *,
    num_layers: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Build a pack from a PEFT LoRA config and its state dict (PEFT key names -> tensors).

    ``metadata`` is the PEFT file's safetensors ``__metadata__`` (``{"format": "pt"}`` when not
    given), kept so export reproduces the file exactly.

    Raises:
        InvalidPack: naming the config field or key that a pack cannot carry, a module whose
            rank, alpha or shape differs across layers, mixed dtypes, or no base_id.
    """
    config = dict(config)
    _check_config(config)
    if base_id is None:
        base_id = config.get("base_model_name_or_path")
        if not isinstance(base_id, str) or not base_id:
            _fail(f"no base_id: pass one, or set base_model_name_or_path in {PEFT_CONFIG_FILE}")
    if not tensors:
        _fail("adapter has no LoRA weights")
    prefix, grouped = _group_keys(tensors)
    dtype = _common_dtype(tensors)
    patterns = _Patterns(config)
    model_prefix = prefix.removeprefix(_PEFT_MODEL_PREFIX)
    modules: list[ModuleSpec] = []
    parts: list[TensorParts] = []
    for name in sorted(grouped):
        by_layer = grouped[name]
        layers = tuple(sorted(by_layer))
        module = _module_spec(name, layers, by_layer, patterns, model_prefix)
        modules.append(module)
        # Stacking is concatenation: the parts are views into the PEFT file, copied once.
        parts.append(
            (lora_a_name(name), dtype, module.shape_a, [by_layer[i][0].data for i in layers])
        )
        parts.append(
            (lora_b_name(name), dtype, module.shape_b, [by_layer[i][1].data for i in layers])
        )
    highest = max(m.layers[-1] for m in modules)
    if num_layers is None:
        num_layers = highest + 1
    manifest = PackManifest(
        base_id=base_id,
        rank=max(m.rank for m in modules),
        alpha=config["lora_alpha"],
        dtype=dtype,
        use_rslora=bool(config.get("use_rslora", False)),
        num_layers=num_layers,
        num_experts=0,
        modules=tuple(modules),
        source={
            "kind": SOURCE_KIND_PEFT,
            "adapter_config": config,
            "key_prefix": prefix,
            "safetensors_metadata": dict(metadata or _PEFT_SAFETENSORS_METADATA),
        },
    )
    return assemble_pack(manifest, parts)


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
    bad = [key for key in keys if not key.endswith(tuple(_LORA_SUFFIXES))]
    for marker, problem in _KEY_PROBLEMS:
        for key in bad:
            if marker in key:
                _fail(f"unsupported key {key!r}: {problem}")
    if bad:
        _fail(f"unsupported key {bad[0]!r}: not a lora_A/lora_B weight of a decoder-layer module")


def _group_keys(
    tensors: Mapping[str, TensorBytes],
) -> tuple[str, dict[str, dict[int, tuple[TensorBytes, TensorBytes]]]]:
    """Split PEFT keys into (layer prefix, {module: {layer: (A, B)}})."""
    prefix: str | None = None
    found: dict[tuple[str, int], dict[str, TensorBytes]] = {}
    _refuse_non_lora_keys(list(tensors))
    for key, tensor in tensors.items():
        suffix = next(s for s in _LORA_SUFFIXES if key.endswith(s))
        parts = key[: -len(suffix)].split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None or index == 0 or index == len(parts) - 1:
            _fail(f"unsupported key {key!r}: outside the decoder layers")
        if not is_decimal(parts[index]) or int(parts[index]) >= MAX_LAYERS:
            _fail(f"unsupported key {key!r}: layer index {parts[index]!r} is not canonical")
        key_prefix = ".".join(parts[:index])
        module = ".".join(parts[index + 1 :])
        if any(p.isdigit() for p in parts[index + 1 :]):
            _fail(
                f"unsupported key {key!r}: module {module!r} has an index inside the layer "
                "(MoE expert LoRA import is not supported yet)"
            )
        if prefix is None:
            prefix = key_prefix
        elif key_prefix != prefix:
            _fail(
                f"unsupported key {key!r}: its layers live under {key_prefix!r} but other keys "
                f"under {prefix!r}; a pack holds one stack of decoder layers"
            )
        found.setdefault((module, int(parts[index])), {})[_LORA_SUFFIXES[suffix]] = tensor
    assert prefix is not None  # tensors was checked non-empty
    grouped: dict[str, dict[int, tuple[TensorBytes, TensorBytes]]] = {}
    for (module, layer), pair in found.items():
        for side, other in (("A", "B"), ("B", "A")):
            if side not in pair:
                _fail(
                    f"key {prefix}.{layer}.{module}.lora_{other}.weight has no matching "
                    f"lora_{side}.weight"
                )
        grouped.setdefault(module, {})[layer] = (pair["A"], pair["B"])
    return prefix, grouped


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


def _module_spec(
    name: str,
    layers: tuple[int, ...],
    by_layer: Mapping[int, tuple[TensorBytes, TensorBytes]],
    patterns: _Patterns,
    model_prefix: str,
) -> ModuleSpec:
    """One module's spec; every layer must agree on shapes, rank and alpha."""
    first_a, first_b = by_layer[layers[0]]
    if len(first_a.shape) != 2 or len(first_b.shape) != 2:
        _fail(f"module {name!r}: lora_A/lora_B must be 2-D, got {first_a.shape}, {first_b.shape}")
    rank, in_features = first_a.shape
    out_features = first_b.shape[0]
    alpha = patterns.alpha_of(f"{model_prefix}.{layers[0]}.{name}")
    for layer in layers:
        a, b = by_layer[layer]
        where = f"module {name!r} layer {layer}"
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            _fail(
                f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} differ from layer "
                f"{layers[0]}'s {[rank, in_features]} / {[out_features, rank]}; "
                "a pack holds one rank and shape per module"
            )
        key = f"{model_prefix}.{layer}.{name}"
        expected_rank = patterns.rank(key)
        if expected_rank != rank:
            _fail(f"{where}: tensors have rank {rank} but {PEFT_CONFIG_FILE} says {expected_rank}")
        layer_alpha = patterns.alpha_of(key)
        if layer_alpha != alpha:
            _fail(
                f"{where}: lora_alpha {layer_alpha} differs from layer {layers[0]}'s {alpha}; "
                "a pack holds one alpha per module"
            )
    return ModuleSpec(
        name=name,
        in_features=in_features,
        out_features=out_features,
        rank=rank,
        alpha=alpha,
        layers=layers,
    )


# ---------------------------------------------------------------- export


def export_peft_dir(
    pack: Pack | bytes | bytearray | memoryview, dest: str | os.PathLike[str]
) -> None:
    """Write ``pack`` as a PEFT adapter directory (created if missing).

    A pack imported from PEFT gets its original config and key names back, byte for byte; any
    other pack gets a synthesized LoRA config. Each file is written to a temporary name and
    renamed into place.

    Raises:
        InvalidPack: ``pack`` bytes are invalid, or it holds MoE experts (no PEFT layout yet).
    """
    if not isinstance(pack, Pack):
        pack = read_pack(pack)
    manifest = pack.manifest
    if manifest.num_experts:
        _fail("exporting MoE expert packs to PEFT is not supported yet")
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
    if not from_peft:
        config = synthesize_peft_config(manifest)
        prefix = DEFAULT_KEY_PREFIX
    assert isinstance(config, dict) and isinstance(prefix, str)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        metadata = _PEFT_SAFETENSORS_METADATA
    tensors: dict[str, TensorBytes] = {}
    for module in manifest.modules:
        stacked_a, stacked_b = pack.module_tensors(module.name)
        for i, layer in enumerate(module.layers):
            tensors[f"{prefix}.{layer}.{module.name}.lora_A.weight"] = stacked_a.index(i)
            tensors[f"{prefix}.{layer}.{module.name}.lora_B.weight"] = stacked_b.index(i)
    weights = serialize_parts(metadata, library_order(tensors))
    config_text = json.dumps(config, indent=2, sort_keys=True).encode()
    directory = Path(dest)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / PEFT_WEIGHTS_FILE, weights)
    write_atomically(directory / PEFT_CONFIG_FILE, config_text)


def synthesize_peft_config(manifest: PackManifest) -> dict[str, Any]:
    """A PEFT LoRA config that makes PEFT rebuild exactly the modules, layers, ranks and alphas
    of ``manifest`` on a causal LM whose decoder layers are ``model.layers``."""
    model_prefix = DEFAULT_KEY_PREFIX.removeprefix(_PEFT_MODEL_PREFIX)
    layer_sets = {m.layers for m in manifest.modules}
    layers_to_transform: list[int] | None = None
    target_modules: list[str]
    if len(layer_sets) == 1:
        # Module names match as suffixes of PEFT's keys; one shared layer subset fits
        # layers_to_transform.
        target_modules = list(manifest.target_modules)
        (layers,) = layer_sets
        if layers != tuple(range(manifest.num_layers)):
            layers_to_transform = list(layers)
    else:
        target_modules = [
            f"{model_prefix}.{layer}.{m.name}" for m in manifest.modules for layer in m.layers
        ]
    alpha: float | int = int(manifest.alpha) if manifest.alpha.is_integer() else manifest.alpha
    return {
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


def write_atomically(path: Path, data: bytes | Sequence[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or chunks written in order) to a temporary file beside ``path``,
    fsync it, and rename it into place."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the adapter from other readers
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                handle.writelines(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
