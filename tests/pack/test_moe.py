"""MoE expert LoRA: both PEFT layouts import to stacked experts, export back bit-exactly, and the
stacked tensors mean what PEFT computes; anything else is refused by name."""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from catalog.errors import InvalidPack
from catalog.pack import (
    ModuleSpec,
    PackManifest,
    TensorBytes,
    export_peft_dir,
    import_peft_dir,
    pack_from_peft_tensors,
    plan_peft_dir,
    read_pack,
    write_pack,
)
from catalog.pack.container import parse_safetensors
from tests import factories
from tests.pack.refusal_checks import (
    peft_parts,
    refused_stray_key,
    refused_tensors,
    refused_unpaired,
)

PREFIX = "base_model.model.model.layers"
_CONFIGS = {
    "mixtral": factories.tiny_mixtral_config,
    "qwen2_moe": factories.tiny_qwen2_moe_config,
    "qwen3_moe": factories.tiny_qwen3_moe_config,
}


@dataclass(frozen=True)
class MoeCase:
    """A real PEFT adapter on a tiny MoE model; ``per_expert`` names the per-expert naming
    (the adapter was made on :func:`factories.per_expert_moe_model`), ``None`` for fused."""

    id: str
    arch: str
    per_expert: str | None
    path: Path


# id -> (arch, per-expert naming or None, adapter kwargs)
MOE_CASES: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "mixtral-fused-attn": (
        "mixtral",
        None,
        dict(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
    ),
    # PEFT 0.21 on transformers 5 rewrites the old Mixtral targets w1/w3/w2 into fused
    # target_parameters, with rank_pattern/alpha_pattern doubling gate_up_proj's rank.
    "mixtral-v4-targets": (
        "mixtral",
        None,
        dict(rank=4, alpha=8, target_modules=("w1", "w2", "w3")),
    ),
    "qwen2moe-fused-bf16-shared": (
        "qwen2_moe",
        None,
        dict(rank=2, alpha=4, dtype=torch.bfloat16, target_modules=("shared_expert.up_proj",)),
    ),
    "qwen3moe-fused-rslora-patterns": (
        "qwen3_moe",
        None,
        dict(rank=4, alpha=8, use_rslora=True, rank_pattern={"down_proj": 2}),
    ),
    "per-expert-w123": (
        "qwen2_moe",
        "mixtral",
        dict(rank=4, alpha=8, target_modules=("w1", "w2", "w3", "q_proj")),
    ),
    "per-expert-gate-up-down-f16": (
        "qwen2_moe",
        "qwen",
        dict(
            rank=2,
            alpha=4,
            dtype=torch.float16,
            target_modules=("gate_proj", "up_proj", "down_proj"),
        ),
    ),
}
#: Cases made with LoraConfig(target_parameters=factories.FUSED_EXPERT_PARAMETERS).
FUSED_TARGETS = {
    "mixtral-fused-attn",
    "qwen2moe-fused-bf16-shared",
    "qwen3moe-fused-rslora-patterns",
}
FP32_CASES = [
    "mixtral-fused-attn",
    "mixtral-v4-targets",
    "qwen3moe-fused-rslora-patterns",
    "per-expert-w123",
]


def _fused_base(arch: str) -> Any:
    return factories.build_model(_CONFIGS[arch]())


def _peft_base(case: MoeCase) -> Any:
    """The model the adapter was made on (a per-expert copy for per-expert cases)."""
    base = _fused_base(case.arch)
    return factories.per_expert_moe_model(base, case.per_expert) if case.per_expert else base


@pytest.fixture(scope="module")
def moe_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MoeCase]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("moe")
    cases = {}
    for case_id, (arch, per_expert, kwargs) in MOE_CASES.items():
        case = MoeCase(case_id, arch, per_expert, root / case_id)
        base = _peft_base(case)
        make = (
            factories.make_peft_moe_adapter
            if case_id in FUSED_TARGETS
            else factories.make_peft_adapter
        )
        make(base, case.path, **kwargs)
        cases[case_id] = case
    return cases


@pytest.fixture(params=sorted(MOE_CASES))
def moe_case(request: pytest.FixtureRequest, moe_cases: dict[str, MoeCase]) -> MoeCase:
    return moe_cases[request.param]


def _copy(case: MoeCase, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(case.path, target)
    return target


# ---------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact(moe_case: MoeCase, tmp_path: Path) -> None:
    pack = import_peft_dir(moe_case.path, base_id="moe")
    export_peft_dir(pack, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        moe_case.path / "adapter_model.safetensors"
    ).read_bytes()
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == json.loads(
        (moe_case.path / "adapter_config.json").read_text()
    )
    # A few dozen stacked tensors, however many expert pairs PEFT wrote.
    peft_keys = len(load_file(str(moe_case.path / "adapter_model.safetensors")))
    manifest = read_pack(pack).manifest
    assert len(read_pack(pack).tensor_names()) == 2 * len(manifest.modules) <= peft_keys


def test_a_plan_written_into_a_buffer_is_the_imported_pack(moe_case: MoeCase) -> None:
    # Expert lora_B parts (per expert, or a fused layer's experts) are transposed as written.
    plan = plan_peft_dir(moe_case.path, base_id="b")
    buffer = bytearray(b"\xa5" * plan.nbytes)
    plan.write_into(memoryview(buffer))
    assert bytes(buffer) == import_peft_dir(moe_case.path, base_id="b")


def test_manifest_records_experts_and_layouts(moe_cases: dict[str, MoeCase]) -> None:
    fused = read_pack(import_peft_dir(moe_cases["mixtral-fused-attn"].path, base_id="m")).manifest
    assert fused.num_experts == 4
    assert {m.name: (m.shape_a, m.shape_b) for m in fused.modules} == {
        "mlp.experts.gate_up_proj": ((2, 4, 4, 64), (2, 4, 192, 4)),
        "mlp.experts.down_proj": ((2, 4, 4, 96), (2, 4, 64, 4)),
        "self_attn.q_proj": ((2, 4, 64), (2, 64, 4)),
        "self_attn.v_proj": ((2, 4, 64), (2, 32, 4)),
    }
    assert fused.source["expert_modules"] == {
        # gate_up_proj is registered first, so PEFT wraps it first: one base_layer deeper.
        "mlp.experts.gate_up_proj": {
            "kind": "peft_parameter",
            "key_module": "mlp.experts.base_layer",
            "lora_b_columns": "rank_major",
        },
        "mlp.experts.down_proj": {
            "kind": "peft_parameter",
            "key_module": "mlp.experts",
            "lora_b_columns": "rank_major",
        },
    }
    per_expert = read_pack(import_peft_dir(moe_cases["per-expert-w123"].path, base_id="q")).manifest
    assert per_expert.num_experts == 4
    assert per_expert.target_modules == (
        "block_sparse_moe.experts.w1",
        "block_sparse_moe.experts.w2",
        "block_sparse_moe.experts.w3",
        "self_attn.q_proj",
    )
    assert per_expert.module("block_sparse_moe.experts.w2").shape_a == (2, 4, 4, 40)
    assert per_expert.source["expert_modules"]["block_sparse_moe.experts.w1"] == {
        "kind": "per_expert",
        "key_module": "block_sparse_moe.experts.{expert}.w1",
    }
    converted = read_pack(import_peft_dir(moe_cases["mixtral-v4-targets"].path, base_id="m"))
    assert converted.manifest.module("mlp.experts.gate_up_proj").rank == 8
    assert converted.manifest.scaling("mlp.experts.gate_up_proj") == 16 / 8
    patterned = read_pack(
        import_peft_dir(moe_cases["qwen3moe-fused-rslora-patterns"].path, base_id="q")
    ).manifest
    assert patterned.module("mlp.experts.down_proj").rank == 2
    assert patterned.scaling("mlp.experts.down_proj") == 8 / 2**0.5


def test_stacked_tensors_are_peft_tensors_rearranged(moe_case: MoeCase) -> None:
    """Checked with torch, independently of the importer's numpy: per-expert keys are slices
    ``[l, e]``; PEFT's fused ``(E*r, in)`` is ``A.reshape(E, r, in)`` and ``(out, r*E)`` is
    ``B.reshape(out, r, E).permute(2, 0, 1)``."""
    pack_bytes = import_peft_dir(moe_case.path, base_id="b")
    manifest = read_pack(pack_bytes).manifest
    stacked = factories.stacked_tensors(pack_bytes)
    peft = load_file(str(moe_case.path / "adapter_model.safetensors"))
    layouts = manifest.source.get("expert_modules", {})
    seen = set()
    for spec in manifest.modules:
        a_all, b_all = stacked[f"layers.{spec.name}.lora_A"], stacked[f"layers.{spec.name}.lora_B"]
        layout = layouts.get(spec.name)
        for i, layer in enumerate(spec.layers):
            if layout is None:
                keys = {None: f"{PREFIX}.{layer}.{spec.name}"}
            elif layout["kind"] == "per_expert":
                keys = {
                    e: f"{PREFIX}.{layer}.{layout['key_module'].replace('{expert}', str(e))}"
                    for e in range(spec.num_experts)
                }
            else:
                key = f"{PREFIX}.{layer}.{layout['key_module']}"
                a, b = peft[f"{key}.lora_A.weight"], peft[f"{key}.lora_B.weight"]
                experts, out = spec.num_experts, b.shape[0]
                assert torch.equal(a_all[i], a.reshape(experts, -1, a.shape[1]))
                assert torch.equal(b_all[i], b.reshape(out, -1, experts).permute(2, 0, 1))
                seen.update({f"{key}.lora_A.weight", f"{key}.lora_B.weight"})
                continue
            for e, key in keys.items():
                a_got = a_all[i] if e is None else a_all[i, e]
                b_got = b_all[i] if e is None else b_all[i, e]
                assert torch.equal(a_got, peft[f"{key}.lora_A.weight"]), key
                assert torch.equal(b_got, peft[f"{key}.lora_B.weight"]), key
                seen.update({f"{key}.lora_A.weight", f"{key}.lora_B.weight"})
    assert seen == set(peft), "every PEFT tensor is in the pack"


# ---------------------------------------------------------------- numerics


def test_fused_delta_per_expert_is_scaled_x_at_a_b(moe_cases: dict[str, MoeCase]) -> None:
    """What PEFT's wrapped model adds for expert e, read from inside its own forward pass, is
    ``scaling * x @ A_e.T @ B_e.T`` with the pack's stacked tensors."""
    from peft import PeftModel

    case = moe_cases["mixtral-fused-attn"]
    base = _fused_base(case.arch)
    reference = _fused_base(case.arch)
    model = PeftModel.from_pretrained(base, str(case.path))
    pack_bytes = import_peft_dir(case.path, base_id="b")
    manifest, stacked = read_pack(pack_bytes).manifest, factories.stacked_tensors(pack_bytes)

    seen: dict[int, dict[str, torch.Tensor]] = {}

    def capture(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            # Inside the forward, PEFT has parametrized the fused weights as W + delta.
            seen[layer] = {
                name: getattr(module, name).detach().clone()
                for name in ("gate_up_proj", "down_proj")
            }

        return hook

    for layer, block in enumerate(base.model.layers):
        block.mlp.experts.get_base_layer().register_forward_pre_hook(capture(layer))
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 9)))
    assert sorted(seen) == [0, 1]
    gen = torch.Generator().manual_seed(3)
    for layer in (0, 1):
        experts = reference.model.layers[layer].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            module = f"mlp.experts.{name}"
            delta = seen[layer][name] - getattr(experts, name).detach()
            a, b = (
                stacked[f"layers.{module}.lora_A"][layer],
                stacked[f"layers.{module}.lora_B"][layer],
            )
            scaling = manifest.scaling(module)
            for e in range(manifest.num_experts):
                x = torch.randn(5, a.shape[-1], generator=gen)
                got = x @ delta[e].T  # transformers 5 applies F.linear(x, W[e])
                expected = scaling * x @ a[e].T @ b[e].T
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
                assert expected.abs().max() > 1e-3, "the adapter must not be a no-op"


@pytest.mark.parametrize("case_id", FP32_CASES)
def test_peft_forward_matches_merged_pack_reference(
    moe_cases: dict[str, MoeCase], case_id: str
) -> None:
    """PEFT's own forward with the adapter equals the fused base with every stacked expert
    merged per expert (per-expert w1/w3 on gate_up_proj's gate/up rows): the pack means what
    the PEFT adapter means, in both layouts."""
    from peft import PeftModel

    case = moe_cases[case_id]
    peft_model = PeftModel.from_pretrained(_peft_base(case), str(case.path))
    reference = factories.merged_moe_reference(
        _fused_base(case.arch), import_peft_dir(case.path, base_id="b")
    )
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = peft_model(ids).logits
        expected = reference(ids).logits
        plain = _fused_base(case.arch)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3, "the adapter must change the output"


def test_synthesized_fused_export_loads_identically_in_peft(
    moe_cases: dict[str, MoeCase], tmp_path: Path
) -> None:
    """A fused-expert pack without PEFT provenance exports as target_parameters with the nesting
    PEFT itself builds: PEFT loads it to the same weights and the same outputs."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    case = moe_cases["qwen3moe-fused-rslora-patterns"]
    pack = read_pack(import_peft_dir(case.path, base_id="b"))
    bare = write_pack(
        replace(pack.manifest, source={}), {n: pack.tensor(n) for n in pack.tensor_names()}
    )
    export_peft_dir(bare, tmp_path / "synth")
    config = json.loads((tmp_path / "synth" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["target_modules"] == []
    original = PeftModel.from_pretrained(_fused_base(case.arch), str(case.path))
    synthesized = PeftModel.from_pretrained(_fused_base(case.arch), str(tmp_path / "synth"))
    want, got = get_peft_model_state_dict(original), get_peft_model_state_dict(synthesized)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(synthesized(ids).logits, original(ids).logits)
    reimported = read_pack(import_peft_dir(tmp_path / "synth"))
    assert reimported.manifest.modules == pack.manifest.modules
    for name in pack.tensor_names():
        assert reimported.tensor(name) == pack.tensor(name)


# ---------------------------------------------------------------- refusals


def test_fused_wrong_rows(moe_cases: dict[str, MoeCase]) -> None:
    config, tensors = peft_parts(moe_cases["mixtral-fused-attn"].path)
    key = f"{PREFIX}.1.mlp.experts.lora_A.weight"
    tensors[key] = TensorBytes("F32", (12, 96), memoryview(bytes(12 * 96 * 4)))
    refused_tensors(
        config,
        tensors,
        r"module 'mlp.experts.down_proj' layer 1: lora_B has 16 columns but lora_A has 12 "
        r"rows; both must be experts x rank",
    )
    b_key = f"{PREFIX}.1.mlp.experts.lora_B.weight"
    tensors[b_key] = TensorBytes("F32", (64, 12), memoryview(bytes(12 * 64 * 4)))
    refused_tensors(
        config,
        tensors,
        r"module 'mlp.experts.down_proj' layer 1: lora_A has 12 rows, not 4 experts x rank 4 "
        r"\(rank from adapter_config.json\)",
    )
    tensors[key] = TensorBytes("F32", (15, 96), memoryview(bytes(15 * 96 * 4)))
    tensors[b_key] = TensorBytes("F32", (64, 15), memoryview(bytes(15 * 64 * 4)))
    refused_tensors(
        config,
        tensors,
        r"module 'mlp.experts.down_proj' layer 1: lora_A has 15 rows, not 4 experts x rank 4 .*",
    )


def test_fused_rank_disagreeing_with_config(moe_cases: dict[str, MoeCase]) -> None:
    config, tensors = peft_parts(moe_cases["mixtral-fused-attn"].path)
    refused_tensors(
        {**config, "rank_pattern": {"gate_up_proj": 8}},
        tensors,
        r"module 'mlp.experts.gate_up_proj' layer 0: lora_A has 16 rows, not 4 experts x "
        r"rank 8 \(rank from adapter_config.json\)",
    )


def test_fused_keys_swapped_against_nesting_order(moe_cases: dict[str, MoeCase]) -> None:
    config, tensors = peft_parts(moe_cases["mixtral-fused-attn"].path)
    swapped = {}
    for key, tensor in tensors.items():
        if ".mlp.experts.base_layer." in key:
            key = key.replace(".mlp.experts.base_layer.", ".mlp.experts.")
        elif ".mlp.experts." in key:
            key = key.replace(".mlp.experts.", ".mlp.experts.base_layer.")
        swapped[key] = tensor
    refused_tensors(
        config,
        swapped,
        r"module 'mlp.experts.gate_up_proj' reads 96 features but 'mlp.experts.down_proj' "
        r"writes 192: the keys do not hold the parameters PEFT's nesting order "
        r"\['gate_up_proj', 'up_proj', 'down_proj'\] implies",
    )


#: A tensor of each case to put under a stray key.
_STRAY_KEY_TENSOR = {
    "mixtral-fused-attn": f"{PREFIX}.0.mlp.experts.lora_A.weight",
    "per-expert-w123": f"{PREFIX}.0.block_sparse_moe.experts.0.w1.lora_A.weight",
}


@pytest.mark.parametrize(
    ("case_id", "key", "problem"),
    [
        (
            "mixtral-fused-attn",
            f"{PREFIX}.0.mlp.experts.base_layer.base_layer.lora_A.weight",
            r"2 base_layer levels but target_parameters name only \['gate_up_proj', "
            r"'down_proj'\] on 'mlp.experts'",
        ),
        (
            "mixtral-fused-attn",
            f"{PREFIX}.0.mlp.experts.lora_A.default.weight",
            "not a lora_A/lora_B weight of a decoder-layer module",
        ),
        (
            "mixtral-fused-attn",
            f"{PREFIX}.0.mlp.experts.lora_magnitude_vector",
            "DoRA magnitude vectors are not supported",
        ),
        (
            "mixtral-fused-attn",
            f"{PREFIX}.0.mlp.base_layer.experts.lora_A.weight",
            "a base_layer level outside a parameter-LoRA module",
        ),
        (
            "mixtral-fused-attn",
            f"{PREFIX}.0.mlp.gate.base_layer.lora_A.weight",
            "base_layer levels but no target_parameters entry names a parameter of 'mlp.gate'",
        ),
        (
            "per-expert-w123",
            f"{PREFIX}.0.block_sparse_moe.experts.01.w1.lora_A.weight",
            "expert index '01' is not canonical",
        ),
        (
            "per-expert-w123",
            f"{PREFIX}.0.block_sparse_moe.experts.9999.w1.lora_A.weight",
            "expert index '9999' is not canonical",
        ),
        (
            "per-expert-w123",
            f"{PREFIX}.0.block_sparse_moe.experts.0.w1.base_layer.lora_A.weight",
            "a base_layer level outside a parameter-LoRA module",
        ),
    ],
)
def test_unknown_expert_key(
    moe_cases: dict[str, MoeCase], case_id: str, key: str, problem: str
) -> None:
    config, tensors = peft_parts(moe_cases[case_id].path)
    refused_stray_key(config, tensors, key, problem, like=_STRAY_KEY_TENSOR[case_id])


def test_fused_parameter_outside_the_nesting_order(moe_cases: dict[str, MoeCase]) -> None:
    config, tensors = peft_parts(moe_cases["mixtral-fused-attn"].path)
    refused_tensors(
        {**config, "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.router_proj"]},
        tensors,
        rf"unsupported key '{PREFIX}.0.mlp.experts.base_layer.lora_A.weight': cannot tell how "
        r"PEFT nested parameters \['gate_up_proj', 'router_proj'\] of 'mlp.experts' "
        r"\(\['router_proj'\] not in the known order .*\)",
    )


@pytest.mark.parametrize(
    ("case_id", "dropped"),
    [
        ("mixtral-fused-attn", f"{PREFIX}.1.mlp.experts.base_layer.lora_B.weight"),
        ("per-expert-w123", f"{PREFIX}.0.block_sparse_moe.experts.1.w3.lora_A.weight"),
    ],
)
def test_expert_lora_unpaired(moe_cases: dict[str, MoeCase], case_id: str, dropped: str) -> None:
    config, tensors = peft_parts(moe_cases[case_id].path)
    refused_unpaired(config, tensors, dropped)


def _drop_expert(tensors: dict[str, TensorBytes], layer: int, expert: int) -> None:
    for key in [k for k in tensors if f".{layer}.block_sparse_moe.experts.{expert}." in k]:
        del tensors[key]


def test_per_expert_missing_expert(moe_cases: dict[str, MoeCase]) -> None:
    config, tensors = peft_parts(moe_cases["per-expert-w123"].path)
    _drop_expert(tensors, 1, 2)
    refused_tensors(
        config,
        tensors,
        r"module 'block_sparse_moe.experts.w1' layer 1: experts \[2\] are missing \(3 of 4 "
        r"present\); a pack holds every expert",
    )


def test_per_expert_last_expert_missing_everywhere(moe_cases: dict[str, MoeCase]) -> None:
    """Only the caller knows the base has 4 experts when expert 3 is gone from every layer."""
    config, tensors = peft_parts(moe_cases["per-expert-w123"].path)
    for layer in (0, 1):
        _drop_expert(tensors, layer, 3)
    refused_tensors(
        config,
        tensors,
        r"module 'block_sparse_moe.experts.w1' layer 0: experts \[3\] are missing \(3 of 4 "
        r"present\); a pack holds every expert",
        num_experts=4,
    )
    assert read_pack(pack_from_peft_tensors(config, tensors, "b")).manifest.num_experts == 3
    refused_tensors(
        config, tensors, r"num_experts must be an integer in \[1, 4096\], got 0", num_experts=0
    )


def test_per_expert_mixed_ranks(moe_cases: dict[str, MoeCase]) -> None:
    config, tensors = peft_parts(moe_cases["per-expert-w123"].path)
    key = f"{PREFIX}.0.block_sparse_moe.experts.2.w1"
    tensors[f"{key}.lora_A.weight"] = TensorBytes("F32", (2, 64), memoryview(bytes(2 * 64 * 4)))
    tensors[f"{key}.lora_B.weight"] = TensorBytes("F32", (40, 2), memoryview(bytes(40 * 2 * 4)))
    refused_tensors(
        config,
        tensors,
        r"module 'block_sparse_moe.experts.w1' layer 0 expert 2: lora_A \[2, 64\] / lora_B "
        r"\[40, 2\] differ from layer 0 expert 0's \[4, 64\] / \[40, 4\]; a pack holds one rank "
        r"and shape per module",
    )
    refused_tensors(
        {**config, "rank_pattern": {r"experts\.3\.w2": 2}},
        peft_parts(moe_cases["per-expert-w123"].path)[1],
        r"module 'block_sparse_moe.experts.w2' layer 0 expert 3: tensors have rank 4 but "
        r"adapter_config.json says 2",
    )
    refused_tensors(
        {**config, "alpha_pattern": {r"experts\.3\.w2": 2}},
        peft_parts(moe_cases["per-expert-w123"].path)[1],
        r"module 'block_sparse_moe.experts.w2' layer 0 expert 3: lora_alpha 2.0 differs from "
        r"layer 0 expert 0's 8.0; a pack holds one alpha per module",
    )


def test_expert_counts_must_agree_across_modules(moe_cases: dict[str, MoeCase]) -> None:
    """A per-expert module with 4 experts beside a fused one whose rows say 2: refused."""
    config, tensors = peft_parts(moe_cases["per-expert-w123"].path)
    fused = {
        f"{PREFIX}.{layer}.mlp.experts.lora_{ab}.weight": TensorBytes(
            "F32", shape, memoryview(bytes(8 * 64 * 4))
        )
        for layer in (0, 1)
        for ab, shape in (("A", (8, 64)), ("B", (64, 8)))
    }
    refused_tensors(
        {**config, "target_parameters": ["mlp.experts.down_proj"]},
        {**tensors, **fused},
        r"module 'mlp.experts.down_proj' layer 0: lora_A has 8 rows, not 4 experts x rank 4 .*",
    )


def test_one_layout_per_module(moe_cases: dict[str, MoeCase]) -> None:
    config, tensors = peft_parts(moe_cases["per-expert-w123"].path)
    dense = f"{PREFIX}.1.block_sparse_moe.experts.w1.lora_A.weight"
    some = tensors[f"{PREFIX}.0.block_sparse_moe.experts.0.w1.lora_A.weight"]
    refused_tensors(
        config,
        {**tensors, dense: some},
        rf"unsupported key '{re.escape(dense)}': module 'block_sparse_moe.experts.w1' is saved "
        r"as a dense module here but as per_expert under 'block_sparse_moe.experts.\{expert\}.w1' "
        r"elsewhere; a pack records one layout per module",
    )


# ---------------------------------------------------------------- export refusals


def _moe_manifest(**source: Any) -> PackManifest:
    return PackManifest(
        base_id="moe",
        rank=2,
        alpha=4.0,
        dtype="F32",
        use_rslora=False,
        num_layers=1,
        num_experts=2,
        modules=(
            ModuleSpec("mlp.experts.w1", 8, 6, rank=2, alpha=4.0, layers=(0,), num_experts=2),
            ModuleSpec("self_attn.q_proj", 8, 8, rank=2, alpha=4.0, layers=(0,)),
        ),
        source={
            "kind": "peft",
            "adapter_config": {"peft_type": "LORA", "r": 2, "lora_alpha": 4},
            "key_prefix": PREFIX,
            **source,
        },
    )


@pytest.mark.parametrize(
    ("layouts", "message"),
    [
        (
            None,
            r"module 'mlp.experts.w1' has 2 experts but the manifest source lacks an expert layout",
        ),
        ({"mlp.experts.w1": {"kind": "zip", "key_module": "x"}}, r"unknown expert layout 'zip'"),
        (
            {"mlp.experts.w1": {"kind": "per_expert", "key_module": "mlp.experts.w1"}},
            r"per-expert key path 'mlp.experts.w1' needs one \{expert\} part after the module",
        ),
        (
            {
                "mlp.experts.w1": {
                    "kind": "per_expert",
                    "key_module": "mlp.experts.{expert}.w1",
                    "x": 1,
                }
            },
            r"expert layout of module 'mlp.experts.w1' has unknown or contradicting fields",
        ),
        (
            {"mlp.experts.w1": {"kind": "peft_parameter", "key_module": "../../etc"}},
            r"expert key path '../../etc' is not a dotted identifier path",
        ),
        (
            {
                "mlp.experts.w1": {"kind": "per_expert", "key_module": "mlp.experts.{expert}.w1"},
                "self_attn.q_proj": {"kind": "per_expert", "key_module": "x.{expert}.y"},
            },
            r"module 'self_attn.q_proj' has 0 experts but the manifest source records an expert "
            r"layout",
        ),
        (
            {
                "mlp.experts.w1": {"kind": "per_expert", "key_module": "mlp.experts.{expert}.w1"},
                "mlp.experts.w9": {"kind": "per_expert", "key_module": "mlp.experts.{expert}.w9"},
            },
            r"manifest source names expert module 'mlp.experts.w9' that the pack does not have",
        ),
        ("not a table", r"manifest source expert_modules is not a JSON object"),
    ],
)
def test_export_refuses_bad_recorded_layouts(layouts: Any, message: str, tmp_path: Path) -> None:
    from tests.pack.synth import random_tensors

    source = {} if layouts is None else {"expert_modules": layouts}
    manifest = _moe_manifest(**source)
    with pytest.raises(InvalidPack) as info:
        export_peft_dir(write_pack(manifest, random_tensors(manifest)), tmp_path / "out")
    assert re.fullmatch(message, str(info.value)), str(info.value)
    assert not (tmp_path / "out").exists()


def test_export_of_a_recorded_per_expert_layout(tmp_path: Path) -> None:
    from tests.pack.synth import random_tensors

    layout = {"kind": "per_expert", "key_module": "mlp.experts.{expert}.w1"}
    manifest = _moe_manifest(expert_modules={"mlp.experts.w1": layout})
    tensors = random_tensors(manifest)
    export_peft_dir(write_pack(manifest, tensors), tmp_path / "out")
    exported = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(exported) == sorted(
        [f"{PREFIX}.0.mlp.experts.{e}.w1.lora_{ab}.weight" for e in (0, 1) for ab in "AB"]
        + [f"{PREFIX}.0.self_attn.q_proj.lora_{ab}.weight" for ab in "AB"]
    )
    stacked_a = torch.frombuffer(
        bytearray(tensors["layers.mlp.experts.w1.lora_A"].data), dtype=torch.float32
    )
    assert torch.equal(
        exported[f"{PREFIX}.0.mlp.experts.1.w1.lora_A.weight"].flatten(), stacked_a[16:]
    )


# ---------------------------------------------------------------- properties


@st.composite
def _moe_adapters(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, TensorBytes]]:
    """Random well-formed MoE adapters, without torch: either layout, any dtype, random bytes
    (NaN payloads and signed zeros included, which a float round trip would not keep)."""
    dtype = draw(st.sampled_from(["F32", "BF16", "F16"]))
    experts = draw(st.integers(2, 5))
    rank = draw(st.integers(1, 3))
    hidden, inter = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    layers = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    fused = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}[dtype]

    def tensor(shape: tuple[int, int]) -> TensorBytes:
        return TensorBytes(dtype, shape, memoryview(rng.randbytes(shape[0] * shape[1] * itemsize)))

    tensors: dict[str, TensorBytes] = {}
    config: dict[str, Any] = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}
    for layer in layers:
        key = f"{PREFIX}.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = tensor((rank, hidden))
        tensors[f"{key}.lora_B.weight"] = tensor((hidden, rank))
        if fused:
            config["target_parameters"] = list(factories.FUSED_EXPERT_PARAMETERS)
            for path, (fin, fout) in (
                ("mlp.experts.base_layer", (hidden, 2 * inter)),
                ("mlp.experts", (inter, hidden)),
            ):
                tensors[f"{PREFIX}.{layer}.{path}.lora_A.weight"] = tensor((experts * rank, fin))
                tensors[f"{PREFIX}.{layer}.{path}.lora_B.weight"] = tensor((fout, experts * rank))
        else:
            for e in range(experts):
                for proj, (fin, fout) in (("w1", (hidden, inter)), ("w2", (inter, hidden))):
                    key = f"{PREFIX}.{layer}.block_sparse_moe.experts.{e}.{proj}"
                    tensors[f"{key}.lora_A.weight"] = tensor((rank, fin))
                    tensors[f"{key}.lora_B.weight"] = tensor((fout, rank))
    return config, tensors


@settings(max_examples=40, deadline=None, derandomize=True)
@given(adapter=_moe_adapters())
def test_random_moe_adapters_round_trip_bit_exactly(
    adapter: tuple[dict[str, Any], dict[str, TensorBytes]],
) -> None:
    config, tensors = adapter
    pack = read_pack(pack_from_peft_tensors(config, tensors, "b"))
    assert pack.manifest.num_experts >= 2
    with tempfile.TemporaryDirectory() as tmp:
        export_peft_dir(pack, tmp)
        exported = parse_safetensors((Path(tmp) / "adapter_model.safetensors").read_bytes())
    assert sorted(exported.tensors) == sorted(tensors)
    for key, tensor in tensors.items():
        assert exported.tensors[key] == tensor, key
