"""Each row of a mixed batch equals PEFT with that row's adapter alone; base rows equal the base.

Covers prefill (the gather path), single-token decode against a KV cache (the wide path),
generation, and both Llama and Qwen2 (q/k/v with bias) bases, in fp32 within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from engine_plugin import layers
from engine_plugin.model_cache import cache_kwargs, returned_cache
from tests.engine.conftest import ADAPTER_SPECS, Arch, make_ids, rel_err

TOLERANCE = 1e-4
MIXED = ["t/qv-r8", "t/all-r4", None, "t/mlp-r16-rs", "t/ko-r2-bf16", "t/one-layer", "t/qv-r8"]


def check_rows(arch: Arch, logits: torch.Tensor, ids: torch.Tensor, adapters: list) -> None:
    for row, adapter in enumerate(adapters):
        expected = arch.reference_logits(adapter, ids[row : row + 1])[0]
        err = rel_err(logits[row], expected)
        assert err <= TOLERANCE, f"row {row} ({adapter}): relative error {err:.2e}"


def test_prefill_rows_match_peft_alone(arch: Arch) -> None:
    engine = arch.engine(num_slots=6)
    ids = make_ids(len(MIXED), 9, seed=1)
    logits = engine.forward(ids, MIXED).logits
    check_rows(arch, logits, ids, MIXED)
    # the adapters really change the output, so agreement above is not vacuous
    base = arch.reference_logits(None, ids)
    for row, adapter in enumerate(MIXED):
        changed = rel_err(logits[row], base[row])
        assert (changed > 1e-3) == (adapter is not None), (row, adapter, changed)


def test_decode_step_with_cache_matches_peft(arch: Arch) -> None:
    """One token per row after a prompt: the wide path, with a KV cache built by the engine."""
    engine = arch.engine(num_slots=6)
    ids = make_ids(len(MIXED), 6, seed=2)
    prompt, step = ids[:, :5], ids[:, 5:]
    out = engine.forward(prompt, MIXED, use_cache=True)
    logits = engine.forward(step, MIXED, **cache_kwargs(engine.model, returned_cache(out))).logits
    for row, adapter in enumerate(MIXED):
        expected = arch.reference_logits(adapter, ids[row : row + 1])[0, -1]
        assert rel_err(logits[row, -1], expected) <= TOLERANCE, (row, adapter)


@pytest.mark.parametrize("tokens", [1, layers.WIDE_MAX_TOKENS_PER_ROW, 12])
def test_wide_and_gather_paths_agree(llama: Arch, tokens: int) -> None:
    engine = llama.engine(num_slots=6)
    ids = make_ids(len(MIXED), tokens, seed=3)
    check_rows(llama, engine.forward(ids, MIXED).logits, ids, MIXED)


def test_many_slots_few_rows_takes_gather_path(llama: Arch) -> None:
    """A high slot in a small batch: the plan refuses the wide path, results stay exact."""
    engine = llama.engine(num_slots=8)
    for name in ADAPTER_SPECS:
        engine.attach(name)
    ids = make_ids(1, 1, seed=4)
    plan = layers.plan_batch(
        engine.pool, (engine.slots.get(digest_of(engine, "t/one-layer")).slot,)
    )
    assert all(p is None or not p.wide_slots for p in plan.modules.values())
    check_rows(llama, engine.forward(ids, ["t/one-layer"]).logits, ids, ["t/one-layer"])


def digest_of(engine, name: str) -> str:  # type: ignore[no-untyped-def]
    return next(r["digest"] for r in engine.stats()["resident"] if r["name"] == name)


def test_all_base_batch_equals_base(arch: Arch) -> None:
    engine = arch.engine()
    ids = make_ids(3, 7, seed=5)
    logits = engine.forward(ids, [None, None, None]).logits
    assert torch.equal(logits, arch.reference_logits(None, ids))


def test_generate_matches_peft_generate(arch: Arch) -> None:
    engine = arch.engine(num_slots=4)
    adapters = ["t/qv-r8", None, "t/mlp-r16-rs", "t/all-r4"]
    ids = make_ids(len(adapters), 5, seed=6)
    tokens = engine.generate(ids, adapters, max_new_tokens=6)
    assert tokens.shape == (len(adapters), 11)
    for row, adapter in enumerate(adapters):
        model = arch.base if adapter is None else arch.peft(adapter)
        with torch.no_grad():
            expected = model.generate(
                input_ids=ids[row : row + 1],
                attention_mask=torch.ones_like(ids[row : row + 1]),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
            )
        assert torch.equal(tokens[row], expected[0]), (row, adapter)


def test_bf16_base_is_close_to_peft(llama: Arch) -> None:
    """bf16 resident base: same adapters, looser tolerance (bf16 rounding)."""
    from peft import PeftModel

    from engine_plugin import ResidentEngine

    base16 = llama.fresh_base().to(torch.bfloat16)
    engine = ResidentEngine(
        base16, catalog=llama.source(), num_slots=4, max_rank=16, base_id=llama.base_id
    )
    adapters = ["t/qv-r8", "t/all-r4", None]
    ids = make_ids(3, 6, seed=7)
    logits = engine.forward(ids, adapters).logits.float()
    for row, adapter in enumerate(adapters):
        model = llama.fresh_base().to(torch.bfloat16)
        if adapter is not None:
            model = PeftModel.from_pretrained(
                model, str(llama.dirs[adapter]), autocast_adapter_dtype=False
            )
        with torch.no_grad():
            expected = model(input_ids=ids[row : row + 1]).logits[0].float()
        assert rel_err(logits[row], expected) <= 2e-2, (row, adapter)


def test_wide_path_isolates_rows_from_other_tenants_slots(llama: Arch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The wide path reads every slot below the highest in use; a resident adapter whose
    weights overflow to inf on someone else's input must still not touch their rows."""
    from peft import LoraConfig, get_peft_model

    from catalog.pack import import_peft_dir

    model = get_peft_model(
        llama.fresh_base(), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.fill_(3e38)  # finite in fp32, but x @ A^T overflows
    model.save_pretrained(str(tmp_path / "huge"))
    source = llama.source()
    source.publish("t/huge", import_peft_dir(tmp_path / "huge", base_id=llama.base_id))
    engine = llama.engine(source, num_slots=3)
    engine.attach("t/huge")  # slot 0: below the slots the batch uses
    adapters = ["t/qv-r8", None]
    ids = make_ids(2, 1, seed=9)
    logits = engine.forward(ids, adapters).logits
    assert torch.isfinite(logits).all()
    check_rows(llama, logits, ids, adapters)
