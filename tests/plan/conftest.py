"""Real PEFT adapters (made by `peft` on a tiny Llama built from a config) for the plan tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import build_model, make_peft_adapter, tiny_llama_config

BASE_ID = "tiny-llama-plan"
#: Ranks and targets of the adapters, cycled: packs of several sizes.
SHAPES = (
    (2, ("q_proj", "v_proj")),
    (4, ("q_proj", "v_proj")),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
)


@pytest.fixture(scope="session")
def plan_base_model():  # type: ignore[no-untyped-def]
    return build_model(tiny_llama_config())


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
