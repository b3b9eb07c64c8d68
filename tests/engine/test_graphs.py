"""Captured decode (``engine_plugin.graphs``) and the fused LoRA kernel (``lora_kernels``).

On CPU the decoder runs its steps eagerly through the same static routing a CUDA graph
captures, and the kernel runs under Triton's interpreter: both are checked against PEFT and the
torch reference here; ``test_cuda.py`` checks the captured graphs on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from catalog.pack import import_peft_dir
from engine_plugin import lora_kernels
from engine_plugin.graphs import GraphedDecoder
from tests import factories
from tests.engine.conftest import Arch, make_ids, rel_err

MIXED = ["t/qv-r8", "t/all-r4", None, "t/mlp-r16-rs", "t/one-layer"]


def _greedy_reference(arch: Arch, adapter: str | None, ids: torch.Tensor, steps: int) -> list:
    """Each step's last logits for one row, from PEFT (or the bare base) without a cache."""
    model = arch.base if adapter is None else arch.peft(adapter)
    seq = ids.clone()
    out = []
    with torch.no_grad():
        for _ in range(steps + 1):
            logits = model(input_ids=seq).logits[0, -1]
            out.append(logits)
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    return out


def test_decoder_matches_peft_per_row(llama: Arch) -> None:
    engine = llama.engine(num_slots=5)
    decoder = GraphedDecoder(engine=engine, max_len=32)
    ids = make_ids(len(MIXED), 6, seed=41)
    steps = 4
    with decoder.session(ids, MIXED) as session:
        got = [session.logits.clone()]
        for _ in range(steps):
            got.append(session.step(got[-1].argmax(-1, keepdim=True)).clone())
    for row, adapter in enumerate(MIXED):
        want = _greedy_reference(llama, adapter, ids[row : row + 1], steps)
        for step in range(steps + 1):
            assert rel_err(got[step][row], want[step]) <= 1e-4, (row, adapter, step)


def test_bare_base_decoder_matches_the_base(qwen2: Arch) -> None:
    decoder = GraphedDecoder(qwen2.fresh_base(), max_len=16)
    ids = make_ids(3, 5, seed=42)
    with decoder.session(ids) as session:
        first = session.logits.clone()
        second = session.step(first.argmax(-1, keepdim=True)).clone()
    for row in range(3):
        want = _greedy_reference(qwen2, None, ids[row : row + 1], 1)
        assert rel_err(first[row], want[0]) <= 1e-5
        assert rel_err(second[row], want[1]) <= 1e-5


def test_hot_swap_and_rebinding_reuse_the_bucket(llama: Arch) -> None:
    """Other adapters on the rows, a swap behind a name, a rewind: the same step, re-routed."""
    source = llama.source()
    engine = llama.engine(source, num_slots=3)
    decoder = GraphedDecoder(engine=engine, max_len=32)
    ids = make_ids(2, 5, seed=43)
    with decoder.session(ids, ["t/qv-r8", None]) as session:
        session.step(ids[:, -1:])
        session.rewind(1)
        again = session.step(ids[:, -1:]).clone()
        first = session.logits.clone()
    # The name now serves other bytes: the next session routes to the new slot.
    source.publish("t/qv-r8", llama.packs["t/all-r4"])
    engine.attach("t/qv-r8")
    with decoder.session(ids, ["t/qv-r8", "t/ko-r2-bf16"]) as session:
        swapped = session.step(ids[:, -1:]).clone()
    assert len(decoder._buckets) == 1
    assert torch.equal(first, again)
    full = torch.cat([ids, ids[:, -1:]], dim=1)
    assert rel_err(swapped[0], llama.reference_logits("t/all-r4", full[:1])[0, -1]) <= 1e-4
    assert rel_err(swapped[1], llama.reference_logits("t/ko-r2-bf16", full[1:])[0, -1]) <= 1e-4


def test_session_refusals(llama: Arch) -> None:
    engine = llama.engine(num_slots=2)
    decoder = GraphedDecoder(engine=engine, max_len=8)
    with pytest.raises(ValueError, match="max_len"), decoder.session(make_ids(1, 8), ["t/qv-r8"]):
        pass
    with pytest.raises(ValueError, match="adapters"), decoder.session(make_ids(1, 3)):
        pass
    with decoder.session(make_ids(1, 7), ["t/qv-r8"]) as session:
        session.step(make_ids(1, 1))
        with pytest.raises(ValueError, match="max_len"):
            session.step(make_ids(1, 1))
    # The session's lease ended: the slot can be taken by others.
    assert all(e.leases == 0 for e in engine.slots)


# ----------------------------------------------------------------- the kernel, interpreted


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(lora_kernels, "INTERPRET_ON_CPU", True)
    if not lora_kernels.kernel_available(torch.device("cpu")):
        pytest.skip("Triton is disabled (LORACAT_TRITON=0) or was imported uninterpreted")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "tokens", "k", "n", "rank"),
    [
        (3, 1, 40, (70,), 4),
        (2, 20, 96, (33, 17, 128), 16),
        (4, 1, 256, (300, 40), 8),
        (2, 70, 64, (130,), 1),
        (3, 2, 1500, (70, 33), 4),  # wider than CONFIG.fused_max_k: the split shrink
        (2, 40, 1100, (20, 200, 9), 16),
    ],
)
def test_kernels_match_the_reference(
    interpreted: None,
    dtype: torch.dtype,
    rows: int,
    tokens: int,
    k: int,
    n: tuple[int, ...],
    rank: int,
) -> None:
    gen = torch.Generator().manual_seed(rows * tokens + k)
    slots = 5
    # Every output's slots as in a pool: [S + 1, R, *], zero slot last; scales as columns.
    lora_as = [torch.randn(slots + 1, rank, k, generator=gen).to(dtype) for _ in n]
    lora_bts = [torch.randn(slots + 1, rank, width, generator=gen).to(dtype) for width in n]
    pool_scales = torch.rand(slots + 1, len(n) + 1, generator=gen)
    pool_scales[slots] = 0
    pool_scales[1, 0] = 0  # slot 1 holds an adapter that does not adapt output 0
    for lora_a, lora_bt in zip(lora_as, lora_bts, strict=True):
        lora_a[slots] = 0
        lora_bt[slots] = 0
    scales = [pool_scales[:, g + 1 if g else 0] for g in range(len(n))]
    index = torch.tensor([i % (slots + 1) for i in range(rows)])
    index[-1] = slots  # a base row
    x = torch.randn(rows, tokens, k, generator=gen).to(dtype)
    outs = [torch.randn(rows, tokens, width, generator=gen).to(dtype) for width in n]
    got = [o.clone() for o in outs]
    want = [o.clone() for o in outs]
    lora_kernels.add_lora_group(x, got, lora_as, lora_bts, scales, index, rows)
    for g in range(len(n)):
        lora_kernels.add_lora_reference(x, want[g], lora_as[g], lora_bts[g], scales[g], index, rows)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for g in range(len(n)):
        assert rel_err(got[g].float(), want[g].float()) <= tolerance, g
        assert torch.equal(got[g][-1], outs[g][-1])  # the base row untouched


@pytest.mark.parametrize(
    "config",
    [
        "fused_max_k=0",  # every input through the split shrink, even a narrow one
        "fused_max_k=0,split_chunk=32,split_block_k=16,num_warps=2",
        "fused_max_k=4096,fused_block_k=32",  # a wide input through the fused kernel
        "fused_max_k=4096,fused_block_k=512,num_warps=8",
        "fused_max_k=4096,split_from_tokens=16",  # long rows split, short ones fused
    ],
)
@pytest.mark.parametrize(("tokens", "k"), [(1, 96), (20, 1500)])
def test_every_kernel_config_matches_the_reference(
    interpreted: None, config: str, tokens: int, k: int
) -> None:
    """What ``bench_lora_kernels`` tries on a device computes what the default does."""
    gen = torch.Generator().manual_seed(tokens + k)
    rows, slots, rank, widths = 3, 4, 8, (40, 130)
    lora_as = [torch.randn(slots + 1, rank, k, generator=gen) for _ in widths]
    lora_bts = [torch.randn(slots + 1, rank, n, generator=gen) for n in widths]
    scales = [torch.rand(slots + 1, generator=gen) for _ in widths]
    for lora_a, lora_bt, scale in zip(lora_as, lora_bts, scales, strict=True):
        lora_a[slots], lora_bt[slots], scale[slots] = 0, 0, 0
    index = torch.tensor([2, slots, 0])
    x = torch.randn(rows, tokens, k, generator=gen)
    outs = [torch.randn(rows, tokens, n, generator=gen) for n in widths]
    got = [o.clone() for o in outs]
    want = [o.clone() for o in outs]
    lora_kernels.add_lora_group(
        x, got, lora_as, lora_bts, scales, index, rows, lora_kernels.KernelConfig.parse(config)
    )
    for g in range(len(widths)):
        lora_kernels.add_lora_reference(x, want[g], lora_as[g], lora_bts[g], scales[g], index, rows)
        assert rel_err(got[g], want[g]) <= 1e-5, g
        assert torch.equal(got[g][1], outs[g][1])  # the base row untouched


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fused_block_k=48", "power of two"),
        ("split_block_k=8", "power of two"),
        ("split_chunk=64,split_block_k=128", "split_chunk"),
        ("num_warps=3", "num_warps"),
        ("fused_max_k=-1", "fused_max_k"),
        ("split_from_tokens=-2", "split_from_tokens"),
        ("overlap=2", "overlap"),
        ("fused_max=1024", "field=value"),
        ("split_chunk", "field=value"),
        ("split_chunk=big", "not an integer"),
    ],
)
def test_kernel_config_refusals_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lora_kernels.KernelConfig.parse(text)


def test_kernel_config_text_round_trips() -> None:
    config = lora_kernels.KernelConfig.parse(" fused_max_k=0, num_warps=8 ,")
    assert (config.fused_max_k, config.num_warps, config.split_chunk) == (0, 8, 512)
    assert lora_kernels.KernelConfig.parse(config.text()) == config
    assert lora_kernels.KernelConfig.parse("") == lora_kernels.KernelConfig()


def test_an_unreadable_kernel_config_in_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORACAT_LORA_KERNELS", "num_warps=5")
    with pytest.raises(ValueError, match="LORACAT_LORA_KERNELS='num_warps=5': num_warps"):
        lora_kernels._config_from_env()


def test_kernel_reads_scales_through_a_strided_column(interpreted: None) -> None:
    """The pool's scales are ``[S + 1, modules]``: a module's column has stride ``modules``."""
    pool_scales = torch.zeros(4, 3)
    pool_scales[:, 1] = torch.tensor([0.5, 2.0, 0.0, 0.0])
    lora_a = torch.ones(4, 2, 8)
    lora_bt = torch.ones(4, 2, 5)
    x = torch.ones(2, 1, 8)
    out = torch.zeros(2, 1, 5)
    lora_kernels.add_lora(x, out, lora_a, lora_bt, pool_scales[:, 1], torch.tensor([1, 2]), 2)
    assert torch.equal(out[0], torch.full((1, 5), 2.0 * 2 * 8))
    assert torch.equal(out[1], torch.zeros(1, 5))


@pytest.mark.parametrize("config", [None, "fused_max_k=0,overlap=1"])
def test_decoder_through_the_interpreted_kernel_matches_peft(
    interpreted: None, llama: Arch, monkeypatch: pytest.MonkeyPatch, config: str | None
) -> None:
    """The engine's groups and single modules through the kernels: with the default config,
    and with every input split and the shrink overlapped (the overlapped order on one stream
    here)."""
    if config is not None:
        monkeypatch.setattr(lora_kernels, "OVERLAP_ON_CPU", True)
        monkeypatch.setattr(lora_kernels, "CONFIG", lora_kernels.KernelConfig.parse(config))
    engine = llama.engine(num_slots=5)
    decoder = GraphedDecoder(engine=engine, max_len=16)
    ids = make_ids(len(MIXED), 4, seed=44)
    with decoder.session(ids, MIXED) as session:
        first = session.logits.clone()
        second = session.step(first.argmax(-1, keepdim=True)).clone()
    for row, adapter in enumerate(MIXED):
        want = _greedy_reference(llama, adapter, ids[row : row + 1], 1)
        assert rel_err(first[row], want[0]) <= 1e-4, (row, adapter)
        assert rel_err(second[row], want[1]) <= 1e-4, (row, adapter)


@pytest.mark.parametrize("config", ["fused_max_k=0,overlap=1", "overlap=1"])
def test_the_overlapped_order_matches_the_reference(
    interpreted: None, monkeypatch: pytest.MonkeyPatch, config: str
) -> None:
    """``add_lora_group_over`` with ``overlap``: the split shrink first, then the base, then
    the expand (one stream here; a side stream for the shrink under a CUDA capture)."""
    monkeypatch.setattr(lora_kernels, "OVERLAP_ON_CPU", True)
    gen = torch.Generator().manual_seed(5)
    rows, tokens, k, widths, rank, slots = 3, 2, 96, (40, 24), 8, 4
    lora_as = [torch.randn(slots + 1, rank, k, generator=gen) for _ in widths]
    lora_bts = [torch.randn(slots + 1, rank, n, generator=gen) for n in widths]
    scales = [torch.rand(slots + 1, generator=gen) for _ in widths]
    for lora_a, lora_bt, scale in zip(lora_as, lora_bts, scales, strict=True):
        lora_a[slots], lora_bt[slots], scale[slots] = 0, 0, 0
    weights = [torch.randn(n, k, generator=gen) for n in widths]
    index = torch.tensor([1, slots, 3])
    x = torch.randn(rows, tokens, k, generator=gen)
    calls = []

    def base() -> list[torch.Tensor]:
        calls.append(1)
        return [x @ w.T for w in weights]

    got = lora_kernels.add_lora_group_over(
        base, x, lora_as, lora_bts, scales, index, rows, lora_kernels.KernelConfig.parse(config)
    )
    assert len(calls) == 1
    for g, weight in enumerate(weights):
        want = x @ weight.T
        lora_kernels.add_lora_reference(x, want, lora_as[g], lora_bts[g], scales[g], index, rows)
        assert rel_err(got[g], want) <= 1e-5, g


@pytest.mark.slow
def test_kernels_compile_for_hopper() -> None:
    """Every kernel variant compiles for sm_90 (the interpreter checks results, not types)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(root / "tests/engine/compile_kernels.py")],
        cwd=root,
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok ") == 29


@pytest.mark.slow
def test_one_launch_slot_writes_match_copy_and_zero(
    monkeypatch: pytest.MonkeyPatch, llama: Arch, tmp_path: Path
) -> None:
    """The scatter and zero kernels (``slot_copy``, interpreted) leave every slot byte as the
    per-tensor copies and zeroing do, through attaches, evictions, swaps and detaches."""
    pytest.importorskip("triton")
    source = llama.source()
    # A module on the first layer only: its layout looks whole ("q:6:1") but is not one view.
    first_layer = factories.make_peft_adapter(
        llama.base,
        tmp_path / "first-layer",
        rank=6,
        alpha=12,
        target_modules=("q_proj", "up_proj"),
        seed=7,
        layers_to_transform=[0],
    )
    source.publish("t/first-layer", import_peft_dir(first_layer, base_id=llama.base_id))
    plain = llama.engine(source, num_slots=2)
    monkeypatch.setattr(lora_kernels, "INTERPRET_ON_CPU", True)
    if not lora_kernels.kernel_available(torch.device("cpu")):
        pytest.skip("Triton is disabled or was imported uninterpreted")
    fast = llama.engine(source, num_slots=2)
    assert plain.pool.copier is None and fast.pool.copier is not None
    steps = [
        ("attach", "t/all-r4"),
        ("attach", "t/mlp-r16-rs"),
        ("attach", "t/qv-r8"),  # evicts: rows beyond rank 8 zeroed, other modules cleared
        ("attach", "t/ko-r2-bf16"),
        ("detach", "t/qv-r8"),
        ("attach", "t/one-layer"),  # one layer only: the per-tensor fallback
        ("attach", "t/first-layer"),
        ("attach", "t/all-r4"),
        # the same tenants and evictions again: the zeroing runs come from their cache
        ("detach", "t/all-r4"),
        ("attach", "t/qv-r8"),
        ("attach", "t/mlp-r16-rs"),
        ("detach", "t/qv-r8"),
        ("detach", "t/mlp-r16-rs"),
        ("attach", "t/qv-r8"),
        ("attach", "t/mlp-r16-rs"),
        ("detach", "t/qv-r8"),
        ("detach", "t/mlp-r16-rs"),
    ]
    for op, name in steps:
        for engine in (plain, fast):
            getattr(engine, op)(name)
        for module in plain.pool.modules:
            a, b = plain.pool.modules[module], fast.pool.modules[module]
            assert torch.equal(a.lora_a, b.lora_a), (op, name, module)
            assert torch.equal(a.lora_bt, b.lora_bt), (op, name, module)
        assert torch.equal(plain.pool.scales, fast.pool.scales), (op, name)
    assert any(targets for targets in fast.pool._scatter_targets.values())
    assert fast.pool.copier._tables  # the zero kernel ran too
    ids = make_ids(2, 5, seed=46)
    adapters = ["t/all-r4", "t/first-layer"]
    logits = fast.forward(ids, adapters).logits
    from peft import PeftModel

    want = {
        "t/all-r4": llama.peft("t/all-r4"),
        "t/first-layer": PeftModel.from_pretrained(llama.fresh_base(), str(first_layer)).eval(),
    }
    for row, adapter in enumerate(adapters):
        with torch.no_grad():
            expected = want[adapter](input_ids=ids[row : row + 1]).logits[0]
        assert rel_err(logits[row], expected) <= 1e-4, adapter
