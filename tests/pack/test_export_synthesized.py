"""Packs without PEFT provenance export a synthesized config that PEFT itself loads exactly."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from catalog.errors import InvalidPack
from catalog.pack import (
    ModuleSpec,
    Pack,
    PackManifest,
    export_peft_dir,
    import_peft_dir,
    pack_from_peft_tensors,
    read_pack,
    write_pack,
)
from catalog.pack.container import parse_safetensors
from tests.pack.conftest import ADAPTER_CASES, AdapterCase, _base
from tests.pack.synth import random_tensors


def _without_provenance(pack: Pack) -> bytes:
    manifest = dataclasses.replace(pack.manifest, source={})
    return write_pack(manifest, {name: pack.tensor(name) for name in pack.tensor_names()})


def _load_with_peft(case_id: str, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Load ``adapter_dir`` onto the case's base with PEFT; return LoRA weights and scalings."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    arch, overrides, _ = ADAPTER_CASES[case_id]
    model = PeftModel.from_pretrained(_base(arch, overrides), str(adapter_dir))
    state = dict(get_peft_model_state_dict(model))
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            state[f"{name}#scaling"] = torch.tensor(module.scaling["default"])
    return state


@pytest.mark.parametrize(
    "case_id", ["qwen2-f32-patterns", "qwen2-bf16-layers-rslora", "llama-bf16-all-r4"]
)
def test_synthesized_config_loads_identically_in_peft(
    adapter_cases: dict[str, AdapterCase], case_id: str, tmp_path: Path
) -> None:
    case = adapter_cases[case_id]
    pack = read_pack(import_peft_dir(case.path, base_id="b", num_layers=case.num_layers))
    export_peft_dir(_without_provenance(pack), tmp_path / "synth")

    config = json.loads((tmp_path / "synth" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "b"
    assert config["r"] == pack.manifest.rank
    expected = _load_with_peft(case_id, case.path)
    got = _load_with_peft(case_id, tmp_path / "synth")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def test_modules_on_different_layers(adapter_cases: dict[str, AdapterCase], tmp_path: Path) -> None:
    """q_proj on layers 0 and 1, v_proj on layer 0 only: target_modules become full paths."""
    case = adapter_cases["llama-f32-qv-r8"]
    config = json.loads((case.path / "adapter_config.json").read_text())
    tensors = dict(
        parse_safetensors((case.path / "adapter_model.safetensors").read_bytes()).tensors
    )
    for ab in "AB":
        del tensors[f"base_model.model.model.layers.1.self_attn.v_proj.lora_{ab}.weight"]
    pack = read_pack(pack_from_peft_tensors(config, tensors, "b", num_layers=2))
    assert pack.manifest.module("self_attn.v_proj").layers == (0,)

    (tmp_path / "peft").mkdir()
    export_peft_dir(pack, tmp_path / "peft")  # the original config would target v_proj on 2 layers
    export_peft_dir(_without_provenance(pack), tmp_path / "synth")
    got = _load_with_peft(case.id, tmp_path / "synth")
    lora = {k: v for k, v in got.items() if not k.endswith("#scaling")}
    exported = parse_safetensors((tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
    assert sorted(lora) == sorted(exported.tensors)
    for key, tensor in exported.tensors.items():
        assert lora[key].numpy().tobytes() == tensor.tobytes(), key


def test_synthesized_pack_round_trips_through_peft_export(tmp_path: Path) -> None:
    manifest = PackManifest(
        base_id="b",
        rank=4,
        alpha=8.0,
        dtype="F32",
        use_rslora=False,
        num_layers=2,
        num_experts=0,
        modules=(
            ModuleSpec("self_attn.q_proj", 64, 64, rank=4, alpha=8.0, layers=(0, 1)),
            ModuleSpec("mlp.down_proj", 128, 64, rank=2, alpha=2.5, layers=(0, 1)),
        ),
        source={"kind": "trainer"},
    )
    tensors = random_tensors(manifest)
    export_peft_dir(write_pack(manifest, tensors), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"mlp\.down_proj": 2}
    assert config["alpha_pattern"] == {r"mlp\.down_proj": 2.5}
    assert config["layers_to_transform"] is None
    reimported = read_pack(import_peft_dir(tmp_path / "out"))
    assert reimported.manifest.modules == manifest.modules
    for name, tensor in tensors.items():
        assert reimported.tensor(name) == tensor
    got = _load_with_peft("llama-f32-qv-r8", tmp_path / "out")
    assert math.isclose(
        float(got["base_model.model.model.layers.0.mlp.down_proj#scaling"]), 2.5 / 2
    )


def test_expert_packs_without_a_layout_do_not_export(tmp_path: Path) -> None:
    """An expert module from neither PEFT layout, named like no fused parameter: export cannot
    tell where PEFT would put its experts, so it refuses rather than guess."""
    manifest = PackManifest(
        base_id="moe",
        rank=2,
        alpha=4.0,
        dtype="BF16",
        use_rslora=False,
        num_layers=2,
        num_experts=4,
        modules=(
            ModuleSpec("self_attn.q_proj", 16, 16, rank=2, alpha=4.0, layers=(0, 1)),
            ModuleSpec(
                "mlp.experts.gate_proj", 16, 32, rank=2, alpha=4.0, layers=(0, 1), num_experts=4
            ),
        ),
        source={},
    )
    pack = read_pack(write_pack(manifest, random_tensors(manifest)))
    a, b = pack.module_tensors("mlp.experts.gate_proj")
    assert (a.shape, b.shape) == ((2, 4, 2, 16), (2, 4, 32, 2))
    assert pack.module_tensors("self_attn.q_proj")[0].shape == (2, 2, 16)
    with pytest.raises(
        InvalidPack,
        match=r"module 'mlp.experts.gate_proj' has experts but the pack records no PEFT key "
        r"layout for it, and it names no fused parameter \(gate_up_proj, up_proj, down_proj\)",
    ):
        export_peft_dir(pack, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidPack, match=r"module 'mlp.experts.gate_proj' has 2 experts but "):
        dataclasses.replace(
            manifest,
            modules=(dataclasses.replace(manifest.modules[0], num_experts=2),),
        )
