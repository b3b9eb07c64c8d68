"""The CUDA path: pinned host staging, slot writes on a side stream ordered with compute.

Skipped where no GPU is present (CI runs on CPU); run on a GPU machine with
``pytest tests/engine/test_cuda.py``.
"""

from __future__ import annotations

import threading

import pytest
import torch

from engine_plugin.model_cache import cache_kwargs, returned_cache
from tests.engine.conftest import Arch, make_ids, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MIXED = ["t/qv-r8", "t/all-r4", None, "t/mlp-r16-rs", "t/one-layer"]


@pytest.fixture(autouse=True)
def exact_matmuls() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_mixed_batch_on_cuda_matches_peft(llama: Arch) -> None:
    engine = llama.engine(num_slots=6, device="cuda")
    ids = make_ids(len(MIXED), 7, seed=31)
    prompt = engine.forward(ids.cuda(), MIXED, use_cache=True)
    step = make_ids(len(MIXED), 1, seed=32)
    cache = cache_kwargs(engine.model, returned_cache(prompt))
    logits = engine.forward(step.cuda(), MIXED, **cache).logits
    full = torch.cat([ids, step], dim=1)
    for row, adapter in enumerate(MIXED):
        expected = llama.reference_logits(adapter, full[row : row + 1])[0, -1]
        assert rel_err(logits[row, -1].cpu(), expected) <= 1e-4, (row, adapter)
    staged = next(iter(engine.host.digests()))
    assert engine.host.peek(staged).pinned


def test_attach_while_other_threads_compute(llama: Arch) -> None:
    """Slot writes and zeroing on the side stream never corrupt a running batch."""
    engine = llama.engine(num_slots=3, device="cuda")
    engine.attach("t/qv-r8")
    ids = make_ids(2, 6, seed=33).cuda()
    expected = llama.reference_logits("t/qv-r8", ids[:1].cpu())[0]
    errors: list[float] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            logits = engine.forward(ids, ["t/qv-r8", None]).logits
            errors.append(rel_err(logits[0].cpu(), expected))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(5):
            for name in ["t/all-r4", "t/mlp-r16-rs", "t/ko-r2-bf16"]:
                engine.attach(name)
                engine.detach(name)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert errors and max(errors) <= 1e-4


def test_captured_decode_matches_peft_through_swaps(llama: Arch) -> None:
    """One graph per batch size: other adapters on the rows, an evicting attach and a hot swap
    behind a name all replay the same capture, with PEFT's results."""
    from engine_plugin.graphs import GraphedDecoder
    from tests.engine.test_graphs import _greedy_reference

    source = llama.source()
    engine = llama.engine(source, num_slots=4, device="cuda")
    decoder = GraphedDecoder(engine=engine, max_len=24)
    ids = make_ids(len(MIXED), 6, seed=45)
    batches = [
        MIXED,
        ["t/ko-r2-bf16", None, "t/qv-r8", "t/all-r4", "t/ko-r2-bf16"],
    ]
    for round_, adapters in enumerate(batches):
        if round_ == 1:
            source.publish("t/qv-r8", llama.packs["t/mlp-r16-rs"])
            engine.attach("t/qv-r8")  # a hot swap: the name now serves other bytes
        with decoder.session(ids.cuda(), adapters) as session:
            got = [session.logits.float().cpu()]
            for _ in range(3):
                got.append(session.step(session.logits.argmax(-1, keepdim=True)).float().cpu())
        assert decoder.captures == 1
        for row, adapter in enumerate(adapters):
            reference = "t/mlp-r16-rs" if (round_, adapter) == (1, "t/qv-r8") else adapter
            want = _greedy_reference(llama, reference, ids[row : row + 1], 3)
            for step, logits in enumerate(got):
                assert rel_err(logits[row], want[step]) <= 1e-4, (round_, row, adapter, step)


@pytest.mark.parametrize("fused_max_k", [0, 1 << 30])
def test_captured_decode_with_the_shrink_overlapped(
    llama: Arch, monkeypatch: pytest.MonkeyPatch, fused_max_k: int
) -> None:
    """``KernelConfig.overlap``: the split shrink forked onto a side stream inside the capture
    and joined before the expand gives PEFT's results (and the fused kernel ignores it)."""
    from engine_plugin import lora_kernels
    from engine_plugin.graphs import GraphedDecoder
    from tests.engine.test_graphs import _greedy_reference

    config = lora_kernels.KernelConfig(fused_max_k=fused_max_k, overlap=1)
    monkeypatch.setattr(lora_kernels, "CONFIG", config)
    engine = llama.engine(num_slots=4, device="cuda")
    decoder = GraphedDecoder(engine=engine, max_len=24)
    ids = make_ids(len(MIXED), 6, seed=46)
    with decoder.session(ids.cuda(), MIXED) as session:
        got = [session.logits.float().cpu()]
        for _ in range(3):
            got.append(session.step(session.logits.argmax(-1, keepdim=True)).float().cpu())
    assert decoder.captures == 1
    for row, adapter in enumerate(MIXED):
        want = _greedy_reference(llama, adapter, ids[row : row + 1], 3)
        for step, logits in enumerate(got):
            assert rel_err(logits[row], want[step]) <= 1e-4, (row, adapter, step)


def test_fused_kernel_matches_the_reference_on_cuda() -> None:
    from engine_plugin import lora_kernels

    assert lora_kernels.kernel_available(torch.device("cuda"))
    gen = torch.Generator().manual_seed(7)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for rows, tokens, k, n, rank in ((8, 1, 896, 4864, 16), (4, 128, 4864, 896, 8)):
            lora_a = torch.randn(9, rank, k, generator=gen).to(dtype).cuda()
            lora_bt = torch.randn(9, rank, n, generator=gen).to(dtype).cuda()
            lora_a[8], lora_bt[8] = 0, 0
            scales = torch.rand(9, generator=gen).cuda()
            scales[8] = 0
            index = torch.tensor([i % 9 for i in range(rows)]).cuda()
            x = torch.randn(rows, tokens, k, generator=gen).to(dtype).cuda()
            out = torch.randn(rows, tokens, n, generator=gen).to(dtype).cuda()
            got, want = out.clone(), out.clone()
            lora_kernels.add_lora(x, got, lora_a, lora_bt, scales, index, rows)
            lora_kernels.add_lora_reference(x, want, lora_a, lora_bt, scales, index, rows)
            assert rel_err(got.float(), want.float()) <= tolerance, (dtype, rows, tokens)
