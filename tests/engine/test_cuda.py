"""The CUDA path: pinned host staging, slot writes on a side stream ordered with compute.

Skipped where no GPU is present (CI runs on CPU); run on a GPU machine with
``pytest tests/engine/test_cuda.py``.
"""

from __future__ import annotations

import threading

import pytest
import torch

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
    logits = engine.forward(step.cuda(), MIXED, past_key_values=prompt.past_key_values).logits
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
