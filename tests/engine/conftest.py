"""Real bases and real PEFT adapters for the engine tests, built once per session.

Each architecture gets a handful of adapters saved by ``peft`` itself (non-zero ``lora_B``),
differing in rank, alpha, target modules, rsLoRA, layers and storage dtype, imported into packs
with ``catalog.pack.import_peft_dir``. References come from ``PeftModel`` with one adapter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from catalog.pack import import_peft_dir
from engine_plugin import LocalPackSource, ResidentEngine
from tests import factories

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: adapter name -> make_peft_adapter keyword arguments
ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "t/qv-r8": dict(rank=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=1),
    "t/all-r4": dict(rank=4, alpha=8, target_modules=ALL_LINEARS, seed=2),
    "t/mlp-r16-rs": dict(
        rank=16, alpha=4, target_modules=("up_proj", "down_proj"), seed=3, use_rslora=True
    ),
    "t/ko-r2-bf16": dict(
        rank=2, alpha=3, target_modules=("k_proj", "o_proj"), seed=4, dtype=torch.bfloat16
    ),
    "t/one-layer": dict(
        rank=6, alpha=12, target_modules=("q_proj", "gate_proj"), seed=5, layers_to_transform=[1]
    ),
}


@dataclass
class Arch:
    """A tiny base model of one architecture with its adapters, packs and PEFT references."""

    name: str
    base_id: str
    base: Any
    dirs: dict[str, Path]
    packs: dict[str, bytes]
    _peft: dict[str, Any] = field(default_factory=dict)
    #: What ``engine`` builds unless told otherwise.
    default_slots = 4
    default_max_rank = 16

    def fresh_base(self) -> Any:
        return copy.deepcopy(self.base)

    def peft(self, adapter: str) -> Any:
        """``PeftModel`` with ``adapter`` alone (cached)."""
        from peft import PeftModel

        if adapter not in self._peft:
            model = PeftModel.from_pretrained(copy.deepcopy(self.base), str(self.dirs[adapter]))
            self._peft[adapter] = model.eval()
        return self._peft[adapter]

    def reference_logits(self, adapter: str | None, ids: torch.Tensor) -> torch.Tensor:
        model = self.base if adapter is None else self.peft(adapter)
        with torch.no_grad():
            return model(input_ids=ids).logits

    def source(self) -> LocalPackSource:
        source = LocalPackSource()
        for name, pack in self.packs.items():
            source.publish(name, pack)
        return source

    def engine(self, source: LocalPackSource | None = None, **options: Any) -> ResidentEngine:
        options.setdefault("num_slots", self.default_slots)
        options.setdefault("max_rank", self.default_max_rank)
        return ResidentEngine(
            self.fresh_base(),
            catalog=source if source is not None else self.source(),
            base_id=self.base_id,
            **options,
        )


def _build_arch(name: str, config: Any, root: Path) -> Arch:
    torch.manual_seed(0)
    base = factories.build_model(config, seed=0)
    base_id = f"tiny-{name}"
    dirs = {
        adapter: factories.make_peft_adapter(base, root / adapter.replace("/", "_"), **spec)
        for adapter, spec in ADAPTER_SPECS.items()
    }
    packs = {
        adapter: import_peft_dir(path, base_id=base_id, num_layers=config.num_hidden_layers)
        for adapter, path in dirs.items()
    }
    return Arch(name=name, base_id=base_id, base=base, dirs=dirs, packs=packs)


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Arch:
    return _build_arch("llama", factories.tiny_llama_config(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Arch:
    return _build_arch("qwen2", factories.tiny_qwen2_config(), tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(params=["llama", "qwen2"])
def arch(request: pytest.FixtureRequest) -> Arch:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture
def make_engine(llama: Arch) -> Iterator[Callable[..., ResidentEngine]]:
    """Build engines on the Llama base; closes them after the test."""
    engines: list[ResidentEngine] = []

    def make(source: LocalPackSource | None = None, **options: Any) -> ResidentEngine:
        engine = llama.engine(source, **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def make_ids(rows: int, tokens: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, tokens), generator=gen)
