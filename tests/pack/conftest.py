"""Real PEFT adapters (built once per session) for the pack tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import factories


@dataclass(frozen=True)
class AdapterCase:
    """One real PEFT adapter on disk and the base model it was made for."""

    id: str
    path: Path
    arch: str
    num_layers: int


# id -> (arch, base config overrides, make_peft_adapter kwargs)
ADAPTER_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "llama-f32-qv-r8": ("llama", {}, dict(rank=8, alpha=16)),
    "llama-bf16-all-r4": (
        "llama",
        {},
        dict(
            rank=4,
            alpha=8,
            dtype=torch.bfloat16,
            target_modules=(
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ),
        ),
    ),
    "qwen2-f32-patterns": (
        "qwen2",
        {},
        dict(
            rank=8,
            alpha=16,
            target_modules=("q_proj", "k_proj", "down_proj"),
            rank_pattern={"down_proj": 2, "k_proj": 3},
            alpha_pattern={"q_proj": 32},
        ),
    ),
    "qwen2-bf16-layers-rslora": (
        "qwen2",
        {"num_hidden_layers": 3},
        dict(
            rank=2,
            alpha=4,
            dtype=torch.bfloat16,
            target_modules=("q_proj", "up_proj"),
            layers_to_transform=[0, 2],
            use_rslora=True,
        ),
    ),
    "llama-f16-r1": (
        "llama",
        {},
        dict(rank=1, alpha=1, dtype=torch.float16, target_modules=("o_proj",)),
    ),
}


def _base(arch: str, overrides: dict[str, Any]) -> Any:
    make = factories.tiny_llama_config if arch == "llama" else factories.tiny_qwen2_config
    return factories.build_model(make(**overrides))


@pytest.fixture(scope="session")
def adapter_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterCase]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("peft")
    cases = {}
    for case_id, (arch, overrides, kwargs) in ADAPTER_CASES.items():
        model = _base(arch, overrides)
        path = factories.make_peft_adapter(model, root / case_id, **kwargs)
        cases[case_id] = AdapterCase(case_id, path, arch, model.config.num_hidden_layers)
    return cases


@pytest.fixture(params=sorted(ADAPTER_CASES))
def adapter(request: pytest.FixtureRequest, adapter_cases: dict[str, AdapterCase]) -> AdapterCase:
    return adapter_cases[request.param]


def make_adapter(tmp_path: Path, arch: str = "llama", **kwargs: Any) -> Path:
    """A one-off PEFT adapter (for refusal tests)."""
    torch.set_num_threads(1)
    model = _base(arch, {})
    return factories.make_peft_adapter(model, tmp_path / "adapter", **kwargs)
