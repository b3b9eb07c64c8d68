"""Real PEFT adapters (made by `peft` on a tiny Llama built from a config) for the plan tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import build_model, make_peft_adapter, tiny_llama_config

BASE_ID = "tiny-llama-plan"
#: Ranks and targets of the adapters, cycled: packs of 33 to 262 KiB, so that the pack header
#: (~3 KiB, which the engine's host tier does not hold) stays a small part of each.
SHAPES = (
    (4, ("q_proj", "v_proj")),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
)
MAX_RANK = 16


def plan_model_config():  # type: ignore[no-untyped-def]
    """A small Llama, wider than the other tests' so that adapters are tens of KiB."""
    return tiny_llama_config(hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="session")
def plan_base_model():  # type: ignore[no-untyped-def]
    return build_model(plan_model_config())


def make_packs(base_model, root: Path, count: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    from catalog.pack import import_peft_dir

    packs = []
    for index in range(count):
        rank, targets = SHAPES[index % len(SHAPES)]
        directory = make_peft_adapter(
            base_model, root / f"a{index}", rank=rank, target_modules=targets, seed=index + 1
        )
        packs.append(import_peft_dir(directory, base_id=BASE_ID))
    return packs


@pytest.fixture(scope="session")
def plan_packs(plan_base_model, tmp_path_factory) -> list[bytes]:  # type: ignore[no-untyped-def]
    """24 packs: ranks 2, 4 and 8, two or four target modules."""
    return make_packs(plan_base_model, tmp_path_factory.mktemp("plan-adapters"), 24)
