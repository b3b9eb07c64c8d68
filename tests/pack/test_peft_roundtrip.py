"""Real PEFT adapters: import -> pack -> export is bit-exact, and the pack is plain safetensors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from catalog.pack import (
    PACK_FORMAT,
    SOURCE_KIND_PEFT,
    export_peft_dir,
    import_peft_dir,
    read_pack,
    read_pack_header,
)
from tests.pack.conftest import AdapterCase

_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<layer>\d+)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so comparisons are bit-exact (NaN payloads and -0.0 included)."""
    return t.contiguous().view(torch.uint8)


def _peft_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_round_trip_is_bit_exact(adapter: AdapterCase, tmp_path: Path) -> None:
    pack_bytes = import_peft_dir(adapter.path, base_id="tiny-base")
    export_peft_dir(pack_bytes, tmp_path / "out")

    original, exported = _peft_tensors(adapter.path), _peft_tensors(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert exported[key].shape == tensor.shape, key
        assert torch.equal(_bits(exported[key]), _bits(tensor)), key
    # Same layout as the safetensors library writes: the whole file is identical.
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        adapter.path / "adapter_model.safetensors"
    ).read_bytes()

    config = json.loads((adapter.path / "adapter_config.json").read_text())
    exported_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert exported_config == config
    for field in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"):
        assert exported_config[field] == config[field]
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list((tmp_path / "out").glob("*.tmp")), "temporary files left behind"


def test_pack_opens_with_safetensors_and_stacks_per_layer_tensors(
    adapter: AdapterCase, tmp_path: Path
) -> None:
    pack_bytes = import_peft_dir(adapter.path, base_id="tiny-base")
    pack_path = tmp_path / "adapter.pack"
    pack_path.write_bytes(pack_bytes)

    original = _peft_tensors(adapter.path)
    per_module: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in original.items():
        match = _KEY.match(key)
        assert match, key
        slot = per_module.setdefault(match["module"], {}).setdefault(int(match["layer"]), {})
        slot[match["ab"]] = tensor

    with safe_open(str(pack_path), "pt") as f:
        assert f.metadata()["format"] == PACK_FORMAT
        names = set(f.keys())
        assert names == {f"layers.{m}.lora_{ab}" for m in per_module for ab in "AB"}
        for module, layers in per_module.items():
            order = sorted(layers)
            for ab in "AB":
                expected = torch.stack([layers[i][ab] for i in order])
                if ab == "B":  # stored rank-major (pack format 2): PEFT's B transposed
                    expected = expected.transpose(-1, -2).contiguous()
                got = f.get_tensor(f"layers.{module}.lora_{ab}")
                assert got.dtype == expected.dtype
                assert torch.equal(_bits(got), _bits(expected)), (module, ab)

    manifest = read_pack(pack_bytes).manifest
    assert manifest.target_modules == tuple(sorted(per_module))
    for module, layers in per_module.items():
        spec = manifest.module(module)
        assert spec.layers == tuple(sorted(layers))
        a, b = layers[spec.layers[0]]["A"], layers[spec.layers[0]]["B"]
        assert (spec.rank, spec.in_features, spec.out_features) == (
            a.shape[0],
            a.shape[1],
            b.shape[0],
        )


def test_manifest_records_config_and_provenance(adapter_cases: dict[str, AdapterCase]) -> None:
    case = adapter_cases["qwen2-f32-patterns"]
    manifest = read_pack(import_peft_dir(case.path, base_id="qwen-tiny")).manifest
    config = json.loads((case.path / "adapter_config.json").read_text())

    assert manifest.base_id == "qwen-tiny"
    assert (manifest.dtype, manifest.rank, manifest.alpha) == ("F32", 8, 16.0)
    assert manifest.num_layers == case.num_layers
    assert manifest.num_experts == 0
    assert manifest.source["kind"] == SOURCE_KIND_PEFT
    assert manifest.source["adapter_config"] == config
    assert manifest.source["key_prefix"] == "base_model.model.model.layers"
    ranks = {m.name: (m.rank, m.alpha) for m in manifest.modules}
    assert ranks == {
        "mlp.down_proj": (2, 16.0),
        "self_attn.k_proj": (3, 16.0),
        "self_attn.q_proj": (8, 32.0),
    }
    assert manifest.scaling("self_attn.q_proj") == 32.0 / 8
    assert manifest.scaling("mlp.down_proj") == 16.0 / 2


def test_scaling_matches_peft(adapter: AdapterCase) -> None:
    """The manifest's per-module scaling is what PEFT itself computes when it loads the adapter."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from tests.pack.conftest import ADAPTER_CASES, _base

    arch, overrides, _ = ADAPTER_CASES[adapter.id]
    model = PeftModel.from_pretrained(_base(arch, overrides), str(adapter.path))
    manifest = read_pack(import_peft_dir(adapter.path, base_id="b")).manifest
    seen = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            relative = name.split(".layers.", 1)[1].split(".", 1)[1]
            assert math.isclose(module.scaling["default"], manifest.scaling(relative)), name
            seen += 1
    assert seen == sum(len(m.layers) for m in manifest.modules)


def test_layers_to_transform_and_rslora(adapter_cases: dict[str, AdapterCase]) -> None:
    case = adapter_cases["qwen2-bf16-layers-rslora"]
    manifest = read_pack(import_peft_dir(case.path, base_id="q", num_layers=3)).manifest
    assert manifest.use_rslora
    assert manifest.dtype == "BF16"
    assert {m.layers for m in manifest.modules} == {(0, 2)}
    assert manifest.num_layers == 3
    assert manifest.scaling("mlp.up_proj") == 4 / math.sqrt(2)


def test_base_id_comes_from_config_when_not_given(
    adapter_cases: dict[str, AdapterCase], tmp_path: Path
) -> None:
    case = adapter_cases["llama-f32-qv-r8"]
    target = tmp_path / "named"
    target.mkdir()
    config = json.loads((case.path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Tiny"
    (target / "adapter_config.json").write_text(json.dumps(config))
    (target / "adapter_model.safetensors").write_bytes(
        (case.path / "adapter_model.safetensors").read_bytes()
    )
    assert read_pack(import_peft_dir(target)).manifest.base_id == "meta-llama/Tiny"
    assert read_pack(import_peft_dir(target, base_id="other")).manifest.base_id == "other"


def test_import_is_deterministic_and_header_streams(adapter: AdapterCase) -> None:
    first = import_peft_dir(adapter.path, base_id="b")
    assert import_peft_dir(adapter.path, base_id="b") == first
    pack = read_pack(first)
    manifest, total = read_pack_header(first[: pack.data_offset])
    assert total == len(first)
    assert manifest == pack.manifest


def test_catalog_pack_does_not_import_torch() -> None:
    code = "import sys, catalog.pack; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
