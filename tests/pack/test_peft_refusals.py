"""PEFT adapters a pack cannot carry are refused by name; nothing is dropped silently."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from catalog.errors import InvalidPack
from catalog.pack import TensorBytes, import_peft_dir, pack_from_peft_tensors, read_pack
from tests.pack.conftest import AdapterCase, make_adapter
from tests.pack.refusal_checks import (
    peft_parts,
    refused_stray_key,
    refused_tensors,
    refused_unpaired,
)

PREFIX = "base_model.model.model.layers"


def _refused(path: Path, message: str, **kwargs: object) -> None:
    with pytest.raises(InvalidPack) as info:
        import_peft_dir(path, **kwargs)  # type: ignore[arg-type]
    assert re.fullmatch(message, str(info.value)), str(info.value)


def _copy(case: AdapterCase, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(case.path, target)
    return target


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "nope", rf"PEFT adapter directory '{tmp_path}/nope' does not exist")


def test_missing_config(adapter_cases: dict[str, AdapterCase], tmp_path: Path) -> None:
    path = _copy(adapter_cases["llama-f32-qv-r8"], tmp_path)
    (path / "adapter_config.json").unlink()
    _refused(path, rf"PEFT adapter directory '{path}' has no adapter_config.json", base_id="b")


def test_missing_weights(adapter_cases: dict[str, AdapterCase], tmp_path: Path) -> None:
    path = _copy(adapter_cases["llama-f32-qv-r8"], tmp_path)
    (path / "adapter_model.safetensors").unlink()
    _refused(
        path, rf"PEFT adapter directory '{path}' has no adapter_model.safetensors", base_id="b"
    )
    (path / "adapter_model.bin").write_bytes(b"pickle")
    _refused(
        path,
        rf"PEFT adapter directory '{path}' has no adapter_model.safetensors "
        r"\(adapter_model.bin pickles are not read\)",
        base_id="b",
    )


def test_no_base_id(adapter_cases: dict[str, AdapterCase]) -> None:
    _refused(
        adapter_cases["llama-f32-qv-r8"].path,
        r"no base_id: pass one, or set base_model_name_or_path in adapter_config.json",
    )


def test_corrupt_weights_file(adapter_cases: dict[str, AdapterCase], tmp_path: Path) -> None:
    path = _copy(adapter_cases["llama-f32-qv-r8"], tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[:-3])
    _refused(
        path,
        r"adapter_model.safetensors: tensor '.*': data_offsets .* run past the end .*",
        base_id="b",
    )


def test_config_not_json(adapter_cases: dict[str, AdapterCase], tmp_path: Path) -> None:
    path = _copy(adapter_cases["llama-f32-qv-r8"], tmp_path)
    (path / "adapter_config.json").write_text("{")
    _refused(path, r"adapter_config.json is not valid JSON: .*", base_id="b")


@pytest.mark.parametrize(
    ("feature", "config_message", "key_message"),
    [
        pytest.param(
            {"use_dora": True},
            r"DoRA \(use_dora\)",
            rf"unsupported key '{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector': "
            r"DoRA magnitude vectors are not supported",
            id="dora",
        ),
        pytest.param(
            {"modules_to_save": ["lm_head"]},
            r"modules_to_save",
            r"unsupported key 'base_model.model.lm_head.weight': "
            r"not a lora_A/lora_B weight of a decoder-layer module",
            id="modules_to_save",
        ),
        pytest.param(
            {"lora_bias": True},
            r"LoRA bias \(lora_bias\)",
            rf"unsupported key '{PREFIX}.0.self_attn.q_proj.lora_B.bias': "
            r"bias tensors are not supported",
            id="lora_bias",
        ),
    ],
)
def test_feature_refused_by_config_then_by_its_keys(
    tmp_path: Path, feature: dict[str, object], config_message: str, key_message: str
) -> None:
    """A feature the pack cannot carry is refused by the config field that asks for it and,
    when the config lies (the field turned off), by the weights it saved."""
    path = make_adapter(tmp_path, rank=4, target_modules=("q_proj",), **feature)
    _refused(
        path,
        rf"adapter_config.json: {config_message} is not supported by the pack format",
        base_id="b",
    )
    (field,) = feature
    _edit_config(path, **{field: None if field == "modules_to_save" else False})
    _refused(path, key_message, base_id="b")


@pytest.mark.parametrize(
    ("adapter_kwargs", "message"),
    [
        pytest.param(
            {"target_modules": ("embed_tokens", "q_proj")},
            r"unsupported key 'base_model.model.model.embed_tokens.lora_embedding_A': "
            r"embedding LoRA is not supported",
            id="embedding-lora",
        ),
        pytest.param(
            {"target_modules": ("q_proj", "lm_head")},
            r"unsupported key 'base_model.model.lm_head.base_layer.weight': full base-layer "
            r"weights \(e.g. saved embedding layers\) are not supported",
            id="lm_head-outside-decoder-layers",
        ),
        pytest.param(
            {
                "target_modules": ("q_proj",),
                "rank_pattern": {"model.layers.1.self_attn.q_proj": 2},
            },
            r"module 'self_attn.q_proj' layer 1: lora_A \[2, 64\] / lora_B \[64, 2\] differ "
            r"from layer 0's \[4, 64\] / \[64, 4\]; a pack holds one rank and shape per module",
            id="rank-differs-across-layers",
        ),
        pytest.param(
            {
                "target_modules": ("q_proj",),
                "alpha_pattern": {"model.layers.1.self_attn.q_proj": 2},
            },
            r"module 'self_attn.q_proj' layer 1: lora_alpha 2.0 differs from layer 0's 16.0; "
            r"a pack holds one alpha per module",
            id="alpha-differs-across-layers",
        ),
    ],
)
def test_real_adapter_refused(
    tmp_path: Path, adapter_kwargs: dict[str, object], message: str
) -> None:
    path = make_adapter(tmp_path, rank=4, **adapter_kwargs)
    _refused(path, message, base_id="b")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, r"adapter_config.json: peft_type is 'IA3', expected 'LORA'"),
        ({"r": 0}, r"adapter_config.json: r must be a positive integer, got 0"),
        ({"lora_alpha": "x"}, r"adapter_config.json: lora_alpha must be a number, got 'x'"),
        ({"use_rslora": "yes"}, r"adapter_config.json: use_rslora must be a boolean"),
        (
            {"layer_replication": [[0, 2]]},
            r"adapter_config.json: layer_replication is not supported by the pack format",
        ),
        (
            {"target_parameters": "experts.gate_up_proj"},
            r"adapter_config.json: target_parameters must be a list of parameter names",
        ),
        (
            {"r": 3},
            r"module 'self_attn.q_proj' layer 0: tensors have rank 8 but "
            r"adapter_config.json says 3",
        ),
        (
            {"rank_pattern": {"q_proj": 2}},
            r"module 'self_attn.q_proj' layer 0: tensors have rank 8 "
            r"but adapter_config.json says 2",
        ),
        (
            {"rank_pattern": {"(": 2}},
            r"adapter_config.json: rank_pattern pattern '\(' is not a "
            r"regex: .*",
        ),
        (
            {"alpha_pattern": {"q_proj": "x"}},
            r"adapter_config.json: alpha_pattern entry 'q_proj': "
            r"'x' is invalid",
        ),
    ],
)
def test_config_refused(
    adapter_cases: dict[str, AdapterCase], changes: dict[str, object], message: str
) -> None:
    config, tensors = peft_parts(adapter_cases["llama-f32-qv-r8"].path)
    config.update(changes)
    refused_tensors(config, tensors, message)


def test_mixed_dtypes(adapter_cases: dict[str, AdapterCase]) -> None:
    config, tensors = peft_parts(adapter_cases["llama-f32-qv-r8"].path)
    key = f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = TensorBytes("F16", (32, 8), memoryview(bytes(32 * 8 * 2)))
    refused_tensors(
        config,
        tensors,
        rf"mixed dtypes: '{re.escape(key)}' is F16 but '.*' is F32",
    )


def test_integer_tensors(adapter_cases: dict[str, AdapterCase]) -> None:
    config, _ = peft_parts(adapter_cases["llama-f32-qv-r8"].path)
    tensors = {
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": TensorBytes(
            "I32", (8, 64), memoryview(bytes(2048))
        ),
        f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": TensorBytes(
            "I32", (64, 8), memoryview(bytes(2048))
        ),
    }
    refused_tensors(
        config,
        tensors,
        rf"dtype I32 of '{PREFIX}.0.self_attn.q_proj.lora_A.weight' is not one of F32, BF16, F16",
    )


def test_unpaired_lora_a(adapter_cases: dict[str, AdapterCase]) -> None:
    config, tensors = peft_parts(adapter_cases["llama-f32-qv-r8"].path)
    refused_unpaired(config, tensors, f"{PREFIX}.1.self_attn.v_proj.lora_B.weight")


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (
            "base_model.model.model.norm.weight",
            "not a lora_A/lora_B weight of a decoder-layer module",
        ),
        (
            f"{PREFIX}.0.self_attn.q_proj.lora_A.default.weight",
            "not a lora_A/lora_B weight of a decoder-layer module",
        ),
        ("base_model.model.lm_head.lora_A.weight", "outside the decoder layers"),
        (f"{PREFIX}.00.self_attn.q_proj.lora_A.weight", "layer index '00' is not canonical"),
        (
            f"{PREFIX}.0.mlp.experts.3.0.gate_proj.lora_A.weight",
            "more than one index inside the layer",
        ),
        (
            f"{PREFIX}.0.mlp.experts.3.lora_A.weight",
            "an expert index must sit between module names",
        ),
        (
            f"{PREFIX}.0.self_attn.q_proj.base_layer.lora_A.weight",
            "base_layer levels but no target_parameters entry names a parameter of "
            "'self_attn.q_proj'",
        ),
        (
            "base_model.model.vision.blocks.0.attn.lora_A.weight",
            "its layers live under 'base_model.model.vision.blocks' but other keys under "
            f"'{PREFIX}'; a pack holds one stack of decoder layers",
        ),
    ],
)
def test_unknown_key(adapter_cases: dict[str, AdapterCase], key: str, problem: str) -> None:
    config, tensors = peft_parts(adapter_cases["llama-f32-qv-r8"].path)
    refused_stray_key(
        config, tensors, key, problem, like=f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    )


def test_no_tensors(adapter_cases: dict[str, AdapterCase]) -> None:
    config, _ = peft_parts(adapter_cases["llama-f32-qv-r8"].path)
    refused_tensors(config, {}, r"adapter has no LoRA weights")


def test_pack_from_peft_tensors_builds_synthetic_adapters() -> None:
    """The import core works on tensors made without PEFT (how other tests build adapters)."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    tensors = {
        f"{PREFIX}.{layer}.self_attn.q_proj.lora_{ab}.weight": TensorBytes(
            "BF16", shape, memoryview(bytes([layer + 1]) * (2 * shape[0] * shape[1]))
        )
        for layer in (1, 3)
        for ab, shape in (("A", (2, 8)), ("B", (8, 2)))
    }
    pack = read_pack(pack_from_peft_tensors(config, tensors, "base", num_layers=6))
    assert pack.manifest.num_layers == 6
    a, b = pack.module_tensors("self_attn.q_proj")
    assert a.shape == (2, 2, 8) and b.shape == (2, 8, 2)
    assert a.tobytes() == bytes([2]) * 32 + bytes([4]) * 32


def _q_proj_tensors(shapes: dict[int, tuple[int, int]]) -> dict[str, TensorBytes]:
    """q_proj LoRA of the given layers, lora_A of shape ``shapes[layer]`` (rank, in)."""
    tensors = {}
    for layer, (rank, fan_in) in shapes.items():
        for ab, shape in (("A", (rank, fan_in)), ("B", (8, rank))):
            tensors[f"{PREFIX}.{layer}.self_attn.q_proj.lora_{ab}.weight"] = TensorBytes(
                "BF16", shape, memoryview(bytes(2 * shape[0] * shape[1]))
            )
    return tensors


def test_shape_differs_in_a_later_layer_without_patterns() -> None:
    """With no rank/alpha patterns the stacking checks one layer for all only when every layer
    has its shapes: a later layer that differs is still named."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    refused_tensors(
        config,
        _q_proj_tensors({0: (2, 8), 1: (2, 8), 2: (2, 16), 3: (2, 8)}),
        r"module 'self_attn.q_proj' layer 2: lora_A \[2, 16\] / lora_B \[8, 2\] differ from "
        r"layer 0's \[2, 8\] / \[8, 2\]; a pack holds one rank and shape per module",
    )


def test_rank_differs_from_config_in_every_layer() -> None:
    """Layers that agree with each other but not with the config's r are refused."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}
    refused_tensors(
        config,
        _q_proj_tensors({0: (2, 8), 1: (2, 8)}),
        r"module 'self_attn.q_proj' layer 0: tensors have rank 2 but adapter_config.json says 4",
    )


def test_keys_in_any_order_group_alike() -> None:
    """Keys split under the prefix found first, whatever order they come in (the layer
    index of a key after the first is found without a search): the same pack either way."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    tensors = _q_proj_tensors({layer: (2, 8) for layer in (0, 1, 10, 2)})
    reverse = dict(reversed(list(tensors.items())))
    assert pack_from_peft_tensors(config, tensors, "b") == pack_from_peft_tensors(
        config, reverse, "b"
    )
    pack = read_pack(pack_from_peft_tensors(config, reverse, "b"))
    assert pack.manifest.module("self_attn.q_proj").layers == (0, 1, 2, 10)
