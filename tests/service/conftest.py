from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import build_model, make_peft_adapter, tiny_llama_config
from tests.servers import RunningCatalog, running_catalog

BASE_ID = "tiny-llama-test"


@pytest.fixture(scope="session")
def base_model():  # type: ignore[no-untyped-def]
    return build_model(tiny_llama_config())


@pytest.fixture(scope="session")
def adapter_dirs(base_model, tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """Real PEFT adapters saved by `peft`: different ranks, targets and dtypes."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "qv-r4": make_peft_adapter(
            base_model, root / "qv-r4", rank=4, target_modules=("q_proj", "v_proj"), seed=1
        ),
        "all-r8": make_peft_adapter(
            base_model,
            root / "all-r8",
            rank=8,
            alpha=8,
            target_modules=(
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ),
            seed=2,
        ),
        "down-r2": make_peft_adapter(
            base_model, root / "down-r2", rank=2, target_modules=("down_proj",), seed=3
        ),
    }


@pytest.fixture(scope="session")
def packs(adapter_dirs) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    from catalog.pack import import_peft_dir

    return {key: import_peft_dir(path, base_id=BASE_ID) for key, path in adapter_dirs.items()}


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    with running_catalog(tmp_path / "root") as running:
        yield running


@pytest.fixture
def client(served: RunningCatalog):  # type: ignore[no-untyped-def]
    with served.client() as c:
        yield c
