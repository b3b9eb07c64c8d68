"""MoE expert LoRA in the engine: every row of a mixed batch equals its adapter alone.

Real PEFT adapters on tiny transformers 5 MoE bases (Mixtral, Qwen2-MoE with a shared expert,
Qwen3-MoE) in both layouts found in the wild: fused ``target_parameters`` on the fused experts,
and one LoRA pair per expert made on :func:`factories.per_expert_moe_model` (same weights as
the fused base; see :func:`per_expert_model`). References: ``PeftModel`` with the adapter
alone, on the model it was made on, and, independently, :func:`factories.merged_moe_reference`
(every expert merged into the fused base). fp32, 1e-4 relative.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from catalog.errors import IncompatibleAdapter
from catalog.pack import TensorBytes, import_peft_dir, read_pack, write_pack
from engine_plugin import LocalPackSource, ResidentEngine
from engine_plugin.experts import ExpertsTarget, MultiLoRAExperts, expert_routes
from engine_plugin.model_cache import cache_kwargs, returned_cache
from engine_plugin.staging import SlotRoute
from tests import factories
from tests.engine.conftest import Arch, make_ids, rel_err

TOLERANCE = 1e-4

#: adapter name -> (per-expert naming or None for the fused layout, make_peft_adapter kwargs)
MOE_ADAPTERS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "t/fused-r4": (None, dict(rank=4, alpha=8, seed=11)),
    "t/fused-qv-r8": (None, dict(rank=8, alpha=4, target_modules=("q_proj", "v_proj"), seed=12)),
    # On Qwen2-MoE these names also match the shared expert's linears: dense modules beside
    # the per-expert ones in one pack.
    "t/fused-down-rs": (
        None,
        dict(
            rank=4,
            alpha=8,
            seed=13,
            use_rslora=True,
            target_parameters=("mlp.experts.down_proj",),
        ),
    ),
    "t/w123-q": ("mixtral", dict(rank=4, alpha=8, target_modules=("w1", "w2", "w3", "q_proj"))),
    "t/gate-up-down": (
        "qwen",
        dict(rank=6, alpha=3, target_modules=("gate_proj", "up_proj", "down_proj"), seed=14),
    ),
    "t/attn-only": (
        None,
        dict(rank=2, alpha=4, target_modules=("k_proj", "o_proj"), target_parameters=(), seed=15),
    ),
}

MIXED = [
    "t/fused-r4",
    "t/w123-q",
    None,
    "t/gate-up-down",
    "t/fused-qv-r8",
    "t/attn-only",
    "t/fused-down-rs",
    "t/w123-q",
]


@dataclass
class MoeArch(Arch):
    """A tiny fused-experts base, its adapters (both layouts), packs and references;
    ``naming`` tells which adapters were made on a per-expert model (None: the fused one)."""

    naming: dict[str, str | None] = field(default_factory=dict)
    default_slots = 7
    default_max_rank = 8

    def peft(self, adapter: str) -> Any:
        """``PeftModel`` with ``adapter`` alone, on the model it was made on (cached)."""
        from peft import PeftModel

        if adapter not in self._peft:
            naming = self.naming[adapter]
            model = copy.deepcopy(self.base)
            if naming is not None:
                model = per_expert_model(model, naming)
            self._peft[adapter] = PeftModel.from_pretrained(model, str(self.dirs[adapter])).eval()
        return self._peft[adapter]


def per_expert_model(base: Any, naming: str) -> Any:
    """:func:`factories.per_expert_moe_model` as a transformers 4 era model: PEFT 0.21 rewrites
    the per-expert targets ``w1``/``w2``/``w3`` into fused ``target_parameters`` when the model
    type is ``mixtral`` (when it makes and when it loads an adapter), and a per-expert model has
    no fused parameters; under another model type PEFT adapts, saves and loads the per-expert
    linears as it did on transformers 4."""
    model = factories.per_expert_moe_model(base, naming)
    model.config.model_type = f"per-expert-{model.config.model_type}"
    return model


def _make_adapter(base: Any, naming: str | None, path: Path, spec: dict[str, Any]) -> Path:
    if naming is None:
        return factories.make_peft_moe_adapter(base, path, **spec)
    return factories.make_peft_adapter(per_expert_model(base, naming), path, **spec)


def _build(name: str, config: Any, root: Path) -> MoeArch:
    torch.set_num_threads(1)
    base = factories.build_model(config, seed=0)
    base_id = f"tiny-{name}"
    dirs, naming, packs = {}, {}, {}
    for adapter, (per_expert, spec) in MOE_ADAPTERS.items():
        path = _make_adapter(base, per_expert, root / adapter.replace("/", "_"), spec)
        dirs[adapter], naming[adapter] = path, per_expert
        packs[adapter] = import_peft_dir(path, base_id=base_id)
    return MoeArch(name, base_id, base, dirs, packs, naming=naming)


@pytest.fixture(scope="session")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> MoeArch:
    return _build("mixtral", factories.tiny_mixtral_config(), tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="session")
def qwen2_moe(tmp_path_factory: pytest.TempPathFactory) -> MoeArch:
    config = factories.tiny_qwen2_moe_config()
    return _build("qwen2-moe", config, tmp_path_factory.mktemp("qwen2moe"))


@pytest.fixture(scope="session")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> MoeArch:
    config = factories.tiny_qwen3_moe_config()
    return _build("qwen3-moe", config, tmp_path_factory.mktemp("qwen3moe"))


@pytest.fixture(params=["mixtral", "qwen2_moe", "qwen3_moe"])
def moe(request: pytest.FixtureRequest) -> MoeArch:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def check_rows(arch: MoeArch, logits: torch.Tensor, ids: torch.Tensor, adapters: list) -> None:
    for row, adapter in enumerate(adapters):
        expected = arch.reference_logits(adapter, ids[row : row + 1])[0]
        err = rel_err(logits[row], expected)
        assert err <= TOLERANCE, f"row {row} ({adapter}): relative error {err:.2e}"


# ---------------------------------------------------------------- correctness


def test_packs_hold_the_layouts_under_test(mixtral: MoeArch) -> None:
    """The fixture really exercises both layouts and a dense module in one pack."""
    layouts = {
        name: read_pack(pack).manifest.source.get("expert_modules", {})
        for name, pack in mixtral.packs.items()
    }
    assert {v["kind"] for v in layouts["t/fused-r4"].values()} == {"peft_parameter"}
    assert set(layouts["t/w123-q"]) == {
        "block_sparse_moe.experts.w1",
        "block_sparse_moe.experts.w2",
        "block_sparse_moe.experts.w3",
    }
    assert set(layouts["t/gate-up-down"]) == {
        "mlp.experts.gate_proj",
        "mlp.experts.up_proj",
        "mlp.experts.down_proj",
    }
    assert read_pack(mixtral.packs["t/w123-q"]).manifest.num_experts == 4
    assert "self_attn.q_proj" in read_pack(mixtral.packs["t/w123-q"]).manifest.target_modules


def test_prefill_rows_match_peft_alone(moe: MoeArch) -> None:
    engine = moe.engine()
    ids = make_ids(len(MIXED), 9, seed=1)
    logits = engine.forward(ids, MIXED).logits
    check_rows(moe, logits, ids, MIXED)
    base = moe.reference_logits(None, ids)
    for row, adapter in enumerate(MIXED):
        changed = rel_err(logits[row], base[row])
        assert (changed > 1e-3) == (adapter is not None), (row, adapter, changed)


def test_rows_match_the_merged_per_expert_reference(moe: MoeArch) -> None:
    """An independent reference: each expert's ``scaling * B @ A`` merged into the fused
    base weights (per-expert w1/w3 onto gate_up_proj's gate/up rows)."""
    engine = moe.engine()
    adapters = ["t/w123-q", "t/fused-r4", "t/gate-up-down", None]
    ids = make_ids(len(adapters), 7, seed=2)
    logits = engine.forward(ids, adapters).logits
    for row, adapter in enumerate(adapters):
        model = moe.base
        if adapter is not None:
            model = factories.merged_moe_reference(moe.base, moe.packs[adapter])
        with torch.no_grad():
            expected = model(input_ids=ids[row : row + 1]).logits[0]
        assert rel_err(logits[row], expected) <= TOLERANCE, (row, adapter)


def test_decode_steps_with_cache_match_peft(moe: MoeArch) -> None:
    engine = moe.engine()
    ids = make_ids(len(MIXED), 7, seed=3)
    prompt = ids[:, :5]
    out = engine.forward(prompt, MIXED, use_cache=True)
    for step in (5, 6):
        out = engine.forward(
            ids[:, step : step + 1],
            MIXED,
            **cache_kwargs(engine.model, returned_cache(out)),
            use_cache=True,
        )
        for row, adapter in enumerate(MIXED):
            expected = moe.reference_logits(adapter, ids[row : row + 1, : step + 1])[0, -1]
            assert rel_err(out.logits[row, -1], expected) <= TOLERANCE, (step, row, adapter)


def test_generate_matches_peft_generate(mixtral: MoeArch) -> None:
    engine = mixtral.engine(num_slots=4)
    adapters = ["t/fused-r4", None, "t/w123-q", "t/gate-up-down"]
    ids = make_ids(len(adapters), 5, seed=4)
    tokens = engine.generate(ids, adapters, max_new_tokens=5)
    for row, adapter in enumerate(adapters):
        model = mixtral.base if adapter is None else mixtral.peft(adapter)
        with torch.no_grad():
            expected = model.generate(
                input_ids=ids[row : row + 1],
                attention_mask=torch.ones_like(ids[row : row + 1]),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
            )
        assert torch.equal(tokens[row], expected[0]), (row, adapter)


def test_base_rows(mixtral: MoeArch) -> None:
    """All-base batches run the base experts untouched (bit-exact); base rows of a mixed
    batch go through the grouped path and equal the base to rounding."""
    engine = mixtral.engine()
    ids = make_ids(3, 6, seed=5)
    assert torch.equal(engine.forward(ids, [None, None, None]).logits, mixtral.base(ids).logits)
    logits = engine.forward(ids, [None, "t/fused-r4", None]).logits
    base = mixtral.reference_logits(None, ids)
    for row in (0, 2):
        assert rel_err(logits[row], base[row]) <= 1e-6


def test_same_adapter_in_every_row_and_one_row(qwen2_moe: MoeArch) -> None:
    engine = qwen2_moe.engine(num_slots=2)
    for adapters in (["t/gate-up-down"] * 3, ["t/fused-r4"]):
        ids = make_ids(len(adapters), 4, seed=6)
        check_rows(qwen2_moe, engine.forward(ids, adapters).logits, ids, adapters)


def test_slot_reuse_leaves_nothing_of_the_evicted_adapter(mixtral: MoeArch) -> None:
    """Rank 8 then rank 4 in one slot: the rows 4..7 of every expert must be zero again."""
    engine = mixtral.engine(num_slots=1)
    ids = make_ids(1, 6, seed=7)
    engine.forward(ids, ["t/fused-qv-r8"])
    engine.detach("t/fused-qv-r8")
    assert engine.pool.is_clear(0)
    engine.forward(ids, ["t/fused-r4"])  # fused-r4 is rank 4 into the same slot
    check_rows(mixtral, engine.forward(ids, ["t/fused-r4"]).logits, ids, ["t/fused-r4"])
    engine.forward(ids, ["t/fused-down-rs"])  # evicts fused-r4
    check_rows(mixtral, engine.forward(ids, ["t/fused-down-rs"]).logits, ids, ["t/fused-down-rs"])


def test_overflowing_adapter_does_not_touch_other_rows(mixtral: MoeArch, tmp_path: Path) -> None:
    """Rows only ever meet their own slot's expert weights: a resident adapter whose products
    overflow to inf leaves every other row finite and exact."""
    pack = read_pack(mixtral.packs["t/fused-r4"])
    huge = {}
    for name in pack.tensor_names():
        shape = pack.tensor(name).shape
        data = torch.full(shape, 3e38).numpy().tobytes()  # finite in fp32, x @ A^T overflows
        huge[name] = TensorBytes("F32", shape, memoryview(data))
    source = mixtral.source()
    source.publish("t/huge", write_pack(pack.manifest, huge))
    engine = mixtral.engine(source, num_slots=3)
    adapters = ["t/huge", "t/fused-r4", None, "t/w123-q"]
    ids = make_ids(len(adapters), 5, seed=8)
    logits = engine.forward(ids, adapters).logits
    assert not torch.isfinite(logits[0]).all()
    assert torch.isfinite(logits[1:]).all()
    check_rows(mixtral, logits[1:], ids[1:], adapters[1:])


def test_bf16_base_is_close_to_peft(mixtral: MoeArch) -> None:
    from peft import PeftModel

    base16 = copy.deepcopy(mixtral.base).to(torch.bfloat16)
    engine = ResidentEngine(
        base16, catalog=mixtral.source(), num_slots=3, max_rank=8, base_id=mixtral.base_id
    )
    adapters = ["t/fused-r4", "t/w123-q", None]
    ids = make_ids(3, 6, seed=9)
    logits = engine.forward(ids, adapters).logits.float()
    for row, adapter in enumerate(adapters):
        naming = mixtral.naming[adapter] if adapter is not None else None
        model = copy.deepcopy(mixtral.base)
        if naming is not None:
            model = per_expert_model(model, naming)
        model = model.to(torch.bfloat16)
        if adapter is not None:
            model = PeftModel.from_pretrained(
                model, str(mixtral.dirs[adapter]), autocast_adapter_dtype=False
            )
        with torch.no_grad():
            expected = model(input_ids=ids[row : row + 1]).logits[0].float()
        assert rel_err(logits[row], expected) <= 3e-2, (row, adapter)


# ---------------------------------------------------------------- slots, attach and targets


def test_experts_are_wrapped_with_stacked_expert_slots(qwen2_moe: MoeArch) -> None:
    engine = qwen2_moe.engine(num_slots=3, max_rank=8)
    assert engine.experts == {"mlp.experts": ExpertsTarget("mlp.experts", 4, 64, 40)}
    wrapped = [m for m in engine.model.modules() if isinstance(m, MultiLoRAExperts)]
    assert len(wrapped) == 2
    gate = engine.pool.modules["mlp.experts.gate_proj"]
    assert gate.lora_a.shape == (2, 4, 4, 8, 64) and gate.lora_bt.shape == (2, 4, 4, 8, 40)
    down = engine.pool.modules["mlp.experts.down_proj"]
    assert down.lora_a.shape == (2, 4, 4, 8, 40) and down.lora_bt.shape == (2, 4, 4, 8, 64)
    # the shared expert is a dense MLP: plain linear slots
    assert engine.pool.modules["mlp.shared_expert.up_proj"].lora_a.shape == (2, 4, 8, 64)


def test_attach_is_one_copy_per_staged_tensor(mixtral: MoeArch) -> None:
    """A fused gate_up_proj fills the gate and up slots from one shared staged lora_A."""
    engine = mixtral.engine()
    engine.attach("t/fused-r4")
    staged = engine.host.get(engine.stats()["resident"][0]["digest"])
    assert staged is not None
    assert sorted(staged.modules) == [
        "mlp.experts.down_proj",
        "mlp.experts.gate_proj",
        "mlp.experts.up_proj",
    ]
    gate, up = staged.modules["mlp.experts.gate_proj"], staged.modules["mlp.experts.up_proj"]
    assert gate.lora_a is up.lora_a and gate.lora_a.shape == (2, 4, 4, 64)
    assert gate.lora_bt.shape == up.lora_bt.shape == (2, 4, 4, 96)
    assert staged.nbytes == sum(t.numel() * 4 for t in read_pack_tensors(mixtral, "t/fused-r4"))
    assert engine.stats()["bytes_moved"] == sum(m.nbytes for m in staged.modules.values())


def read_pack_tensors(arch: MoeArch, name: str) -> list[torch.Tensor]:
    from safetensors.torch import load

    return list(load(arch.packs[name]).values())


def test_expert_only_targets(mixtral: MoeArch) -> None:
    engine = mixtral.engine(target_modules=("experts",))
    assert sorted(engine.pool.modules) == [
        "mlp.experts.down_proj",
        "mlp.experts.gate_proj",
        "mlp.experts.up_proj",
    ]
    ids = make_ids(2, 5, seed=10)
    check_rows(mixtral, engine.forward(ids, ["t/fused-r4", None]).logits, ids, ["t/fused-r4", None])
    with pytest.raises(IncompatibleAdapter, match=r"self_attn\.q_proj"):
        engine.attach("t/w123-q")


def test_expert_routes() -> None:
    targets = {"mlp.experts": ExpertsTarget("mlp.experts", 8, 64, 96)}
    assert expert_routes("mlp.experts.gate_up_proj", targets) == [
        SlotRoute("mlp.experts.gate_proj", (0, 96)),
        SlotRoute("mlp.experts.up_proj", (96, 192)),
    ]
    assert expert_routes("block_sparse_moe.experts.w3", targets) == [
        SlotRoute("mlp.experts.up_proj")
    ]
    assert expert_routes("mlp.experts.w2", targets) == [SlotRoute("mlp.experts.down_proj")]
    assert expert_routes("mlp.experts.fc1", targets) is None
    assert expert_routes("other.experts.w1", targets) is None
    exact = {"block_sparse_moe.experts": ExpertsTarget("block_sparse_moe.experts", 8, 64, 96)}
    assert expert_routes("block_sparse_moe.experts.w1", exact) == [
        SlotRoute("block_sparse_moe.experts.gate_proj")
    ]


# ---------------------------------------------------------------- refusals


def test_moe_adapter_on_a_dense_base_is_refused(mixtral: MoeArch) -> None:
    llama = factories.build_model(factories.tiny_llama_config())
    source = LocalPackSource()
    source.publish("t/moe", mixtral.packs["t/fused-r4"])
    engine = ResidentEngine(llama, catalog=source, num_slots=2, max_rank=8)
    with pytest.raises(IncompatibleAdapter, match="no experts modules"):
        engine.attach("t/moe")
    assert source.fetches == 0


def test_other_expert_count_is_refused(mixtral: MoeArch, tmp_path: Path) -> None:
    eight = factories.build_model(factories.tiny_mixtral_config(num_local_experts=8))
    path = factories.make_peft_moe_adapter(eight, tmp_path / "e8", rank=4)
    source = LocalPackSource()
    source.publish("t/e8", import_peft_dir(path, base_id=mixtral.base_id))
    engine = mixtral.engine(source)
    with pytest.raises(IncompatibleAdapter, match=r"adapts 8 experts per layer.*have 4"):
        engine.attach("t/e8")
    assert all(engine.pool.is_clear(s) for s in range(engine.num_slots + 1))


def test_other_expert_shapes_are_refused(mixtral: MoeArch, tmp_path: Path) -> None:
    wider = factories.build_model(factories.tiny_mixtral_config(intermediate_size=80))
    path = factories.make_peft_moe_adapter(wider, tmp_path / "wide", rank=4)
    source = LocalPackSource()
    source.publish("t/wide", import_peft_dir(path, base_id=mixtral.base_id))
    engine = mixtral.engine(source)
    with pytest.raises(IncompatibleAdapter, match=r"'mlp.experts.down_proj' is 80->64 but"):
        engine.attach("t/wide")
    assert len(engine.host) == 0


def test_two_modules_filling_one_slot_module_are_refused(mixtral: MoeArch) -> None:
    """A pack with both a fused gate_up_proj and a per-expert gate_proj cannot be served."""
    fused = read_pack(mixtral.packs["t/fused-r4"])
    per_expert = read_pack(mixtral.packs["t/gate-up-down"])
    gate = per_expert.manifest.module("mlp.experts.gate_proj")
    manifest = replace(
        fused.manifest,
        rank=max(fused.manifest.rank, gate.rank),
        modules=(*fused.manifest.modules, gate),
        source={},
    )
    tensors = {n: fused.tensor(n) for n in fused.tensor_names()}
    for suffix in ("lora_A", "lora_B"):
        name = f"layers.mlp.experts.gate_proj.{suffix}"
        tensors[name] = per_expert.tensor(name)
    source = mixtral.source()
    source.publish("t/both", write_pack(manifest, tensors))
    engine = mixtral.engine(source)
    with pytest.raises(IncompatibleAdapter, match=r"both adapt 'mlp\.experts\.gate_proj'"):
        engine.attach("t/both")


def test_rank_above_max_rank_is_refused_per_projection(mixtral: MoeArch) -> None:
    engine = mixtral.engine(max_rank=4)
    with pytest.raises(IncompatibleAdapter, match="rank 8, above this engine's max_rank 4"):
        engine.attach("t/fused-qv-r8")
    engine.attach("t/fused-r4")  # rank 4 per projection fits rank-4 slots


# ---------------------------------------------------------------- the batched op on its own


def test_expert_deltas_equal_a_per_pair_loop() -> None:
    """MultiLoRAExperts against the definition, one (token, expert) pair at a time: slots of
    different ranks, a slot adapting only down_proj, an empty slot and base rows."""
    from engine_plugin.experts import PROJECTIONS, find_experts
    from engine_plugin.layers import BatchContext, plan_batch
    from engine_plugin.slots import SlotPool, TargetModule
    from engine_plugin.staging import StagedAdapter, StagedModule
    from tests.engine.test_units import revision

    torch.manual_seed(0)
    model = factories.build_model(factories.tiny_mixtral_config(num_local_experts=5))
    layer = model.model.layers[1]
    target = find_experts(layer)["mlp.experts"]
    experts = layer.mlp.experts
    targets = {}
    for projection in PROJECTIONS:
        name = target.slot_module(projection)
        targets[name] = TargetModule(name, *target.features(projection), 2, target.num_experts)
    pool = SlotPool(targets, 3, 4, torch.float32, torch.device("cpu"))

    def staged(n: int, rank: int, projections: tuple[str, ...], scaling: float) -> StagedAdapter:
        modules = {}
        for projection in projections:
            name = target.slot_module(projection)
            fan_in, fan_out = target.features(projection)
            modules[name] = StagedModule(
                name=name,
                rank=rank,
                scaling=scaling,
                layers=(1,),
                lora_a=torch.randn(1, 5, rank, fan_in),
                lora_bt=torch.randn(1, 5, rank, fan_out),
            )
        return StagedAdapter(revision(n), modules, 0, pinned=False)

    pool.write(0, staged(1, 4, PROJECTIONS, 0.5))
    pool.write(2, staged(2, 2, ("down_proj",), 2.0))
    context = BatchContext()
    slots = [pool.modules[target.slot_module(p)] for p in PROJECTIONS]
    wrapped = MultiLoRAExperts(experts, target, slots, 1, context)
    row_slots = (2, pool.zero_slot, 0, 1, 0)
    tokens = 3
    hidden = torch.randn(len(row_slots) * tokens, target.hidden)
    top_k = torch.stack([torch.randperm(5)[:2] for _ in range(hidden.shape[0])])
    weights = torch.softmax(torch.randn(hidden.shape[0], 2), dim=-1)
    context.plan = plan_batch(pool, row_slots)
    with torch.no_grad():
        got = wrapped(hidden, top_k, weights)

    def delta(slots_of: Any, slot: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        a, bt = slots_of.lora_a[1, expert, slot], slots_of.lora_bt[1, expert, slot]
        return slots_of.scalings[slot] * (x @ a.t()) @ bt

    gate_slots, up_slots, down_slots = slots
    inter = target.intermediate
    expected = torch.zeros_like(hidden)
    with torch.no_grad():
        for t in range(hidden.shape[0]):
            slot = row_slots[t // tokens]
            x = hidden[t]
            for k in range(2):
                e = int(top_k[t, k])
                gate_up = x @ experts.gate_up_proj[e].t()
                gate = gate_up[:inter] + delta(gate_slots, slot, e, x)
                up = gate_up[inter:] + delta(up_slots, slot, e, x)
                h = experts.act_fn(gate) * up
                y = h @ experts.down_proj[e].t() + delta(down_slots, slot, e, h)
                expected[t] += weights[t, k] * y
        base = experts(hidden, top_k, weights)
    assert rel_err(got, expected) <= 1e-6
    base_rows = [t for t in range(hidden.shape[0]) if row_slots[t // tokens] in (1, 3)]
    assert rel_err(got[base_rows], base[base_rows]) <= 1e-6
    assert (got - base).abs().amax() > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_mixed_batch_on_cuda(mixtral: MoeArch, dtype: torch.dtype, tolerance: float) -> None:
    """Grouped matmuls on the GPU (bf16: the grouped GEMM kernels), prefill and decode."""
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = ResidentEngine(
        copy.deepcopy(mixtral.base).to(dtype),
        catalog=mixtral.source(),
        num_slots=7,
        max_rank=8,
        base_id=mixtral.base_id,
        device="cuda",
    )
    ids = make_ids(len(MIXED), 7, seed=41)
    prompt = engine.forward(ids[:, :6].cuda(), MIXED, use_cache=True)
    step = engine.forward(
        ids[:, 6:].cuda(), MIXED, **cache_kwargs(engine.model, returned_cache(prompt))
    )
    for row, adapter in enumerate(MIXED):
        expected = mixtral.reference_logits(adapter, ids[row : row + 1])[0]
        got_prompt, got_step = prompt.logits[row].float(), step.logits[row, -1].float()
        assert rel_err(got_prompt.cpu(), expected[:6]) <= tolerance, (row, adapter)
        assert rel_err(got_step.cpu(), expected[-1]) <= tolerance, (row, adapter)


def test_moe_packs_over_grpc_with_prefetch_and_hot_swap(mixtral: MoeArch, tmp_path: Path) -> None:
    """MoE packs through a real catalog server: prefetch, attach, a hot swap of ``serving``
    from the fused layout to a per-expert one, residency reported."""
    from tests.servers import running_catalog

    with running_catalog(tmp_path / "root") as served, served.client() as client:
        client.push("t/moe", mixtral.packs["t/fused-r4"], aliases=("serving",))
        client.push("t/other", mixtral.packs["t/gate-up-down"])
        engine = ResidentEngine(
            copy.deepcopy(mixtral.base),
            catalog=client,
            num_slots=2,
            max_rank=8,
            base_id=mixtral.base_id,
        )
        with engine:
            assert engine.prefetch(["t/other"])[0].result(timeout=60).number == 1
            ids = make_ids(2, 6, seed=51)
            logits = engine.forward(ids, ["t/moe@serving", "t/other"]).logits
            check_rows(mixtral, logits, ids, ["t/fused-r4", "t/gate-up-down"])

            client.push("t/moe", mixtral.packs["t/w123-q"])
            client.set_alias("t/moe", "serving", 2, expected=1)
            engine.attach("t/moe@serving")
            logits = engine.forward(ids, ["t/moe@serving", None]).logits
            check_rows(mixtral, logits, ids, ["t/w123-q", None])
            engine.flush_reports()
            (record,) = [e for e in served.catalog.engines() if e.engine_id == engine.engine_id]
            assert record.gpu == {r["digest"] for r in engine.stats()["resident"]}
            assert str(client.resolve("t/moe@serving").digest) in record.gpu
