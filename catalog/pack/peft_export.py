"""PEFT export: a pack written back as a PEFT adapter directory.

A pack imported from PEFT gets its recorded config and key names back, expert modules in the
layout they came in (:func:`_recorded_layouts`), so a round trip is bit-exact. Any other pack
gets a synthesized config (:func:`synthesize_peft_config`) under the default key prefix; its
expert modules must name fused 3-D parameters, written where PEFT's ``target_parameters`` puts
them (:func:`_synthesized_layouts`). Not to be confused with :mod:`catalog.peft_export`, the
catalog's ``ExportPeftDir`` RPC, which calls :func:`export_peft_dir`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from catalog.errors import InvalidPack
from catalog.pack.atomic_write import write_atomically
from catalog.pack.container import TensorBytes, library_order, serialize_parts
from catalog.pack.format import Pack, read_pack
from catalog.pack.manifest import ModuleSpec, PackManifest
from catalog.pack.peft_experts import (
    BASE_LAYER,
    FUSED_PARAMETER_ORDER,
    LAYOUT_PEFT_PARAMETER,
    LAYOUT_PER_EXPERT,
    ExpertLayout,
    experts_a_to_peft,
    experts_b_to_peft,
    layouts_from_source,
)
from catalog.pack.peft_files import (
    DEFAULT_KEY_PREFIX,
    PEFT_CONFIG_FILE,
    PEFT_MODEL_PREFIX,
    PEFT_SAFETENSORS_METADATA,
    PEFT_WEIGHTS_FILE,
    SOURCE_KIND_PEFT,
)


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


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
        metadata = PEFT_SAFETENSORS_METADATA
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
    model_prefix = DEFAULT_KEY_PREFIX.removeprefix(PEFT_MODEL_PREFIX)
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
