"""PEFT import: a PEFT LoRA adapter (directory, or config and state dict) laid out as a pack.

:func:`plan_from_peft_tensors` checks the config (:mod:`catalog.pack.peft_checks`), groups the
keys into pack modules (:mod:`catalog.pack.peft_keys`), stacks each module
(:mod:`catalog.pack.peft_stacking`) and records in the manifest source what export needs to
write the same files back (the config, the key prefix, the safetensors metadata, each expert
module's layout). The plan's parts are views of the PEFT tensors; ``lora_B`` is transposed to the
pack's rank-major layout as it is written (see :mod:`catalog.pack.format`).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from catalog.errors import InvalidPack
from catalog.pack.container import TensorBytes, loads_strict_json, parse_safetensors
from catalog.pack.format import (
    PackPlan,
    TensorParts,
    lora_a_name,
    lora_b_name,
    plan_pack,
    rank_major_parts,
)
from catalog.pack.manifest import ModuleSpec, PackManifest
from catalog.pack.peft_checks import (
    PeftPatterns,
    check_config,
    check_num_experts,
    common_dtype,
)
from catalog.pack.peft_experts import TargetParameters, check_parameter_nesting
from catalog.pack.peft_files import (
    PEFT_CONFIG_FILE,
    PEFT_MODEL_PREFIX,
    PEFT_SAFETENSORS_METADATA,
    PEFT_WEIGHTS_FILE,
    SOURCE_KIND_PEFT,
)
from catalog.pack.peft_keys import group_keys
from catalog.pack.peft_stacking import count_experts, stack_module

#: The largest ``adapter_config.json`` import reads.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


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
    check_config(config)
    if base_id is None:
        base_id = config.get("base_model_name_or_path")
        if not isinstance(base_id, str) or not base_id:
            _fail(f"no base_id: pass one, or set base_model_name_or_path in {PEFT_CONFIG_FILE}")
    check_num_experts(num_experts)
    if not tensors:
        _fail("adapter has no LoRA weights")
    targets = TargetParameters(config, PEFT_CONFIG_FILE)
    patterns = PeftPatterns(config)
    prefix, groups = group_keys(tensors, targets, patterns)
    dtype = common_dtype(tensors)
    model_prefix = prefix.removeprefix(PEFT_MODEL_PREFIX)
    experts = num_experts or count_experts(groups, patterns, model_prefix)
    modules: list[ModuleSpec] = []
    parts: list[TensorParts] = []
    for name in sorted(groups):
        module, a_parts, b_parts = stack_module(name, groups[name], patterns, model_prefix, experts)
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
        "safetensors_metadata": dict(metadata or PEFT_SAFETENSORS_METADATA),
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
