"""Host (Python) time of a slot write and a slot clear on the one-launch path, without a GPU.

On a GPU an attach is one host-to-device copy and one scatter launch, a detach one zeroing
launch (``engine_plugin.slot_copy``); what the floors then leave is the host work around them.
This times ``SlotPool.write`` and ``SlotPool.clear`` at the 0.5B shape (24 layers, all seven
linears, rank 16 in slots of rank 16) with a copier that records the launch and does nothing,
so only the pool's own bookkeeping is timed: which runs to scatter or zero, the ranks and
scales. The first call of each (slot, layout) works the runs out; later ones find them cached.

    python bench/bench_slot_host.py [--repeats 5000]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import print_table, write_results
from catalog.model import AdapterName, Digest, Revision
from engine_plugin.slots import SlotPool
from engine_plugin.staging import StagedAdapter, StagedModule
from engine_plugin.targets import TargetModule

SHAPES = {
    "q_proj": (896, 896),
    "k_proj": (896, 128),
    "v_proj": (896, 128),
    "o_proj": (896, 896),
    "gate_proj": (896, 4864),
    "up_proj": (896, 4864),
    "down_proj": (4864, 896),
}
LAYERS = 24


class RecordingCopier:
    """Stands in for ``SlotCopier``: takes the calls, launches nothing."""

    def __init__(self) -> None:
        self.writes = 0
        self.zeros = 0

    def write(self, key: object, flat: torch.Tensor, targets: Any) -> None:
        self.writes += 1

    def zero(self, key: object, runs: Any) -> None:
        self.zeros += 1


def staged_adapter(rank: int) -> StagedAdapter:
    """A rank-``rank`` adapter on every module, carved from one flat buffer as staging does."""
    shapes = [(LAYERS, rank, fan_in) for fan_in, _ in SHAPES.values()]
    shapes += [(LAYERS, rank, fan_out) for _, fan_out in SHAPES.values()]
    flat = torch.zeros(sum(math.prod(shape) for shape in shapes), dtype=torch.bfloat16)
    pieces, offset = [], 0
    for shape in shapes:
        pieces.append(flat[offset : offset + math.prod(shape)].view(shape))
        offset += math.prod(shape)
    modules = {
        name: StagedModule(
            name=name,
            rank=rank,
            scaling=2.0,
            layers=tuple(range(LAYERS)),
            lora_a=pieces[i],
            lora_bt=pieces[len(SHAPES) + i],
        )
        for i, name in enumerate(SHAPES)
    }
    revision = Revision(
        adapter=AdapterName.parse("bench/slot-host"),
        number=rank,
        digest=Digest.of(f"bench/slot-host/{rank}".encode()),
        base_id="bench",
        rank=rank,
        alpha=2.0 * rank,
        dtype="bfloat16",
        size_bytes=flat.numel() * 2,
        created_at=0.0,
    )
    return StagedAdapter(
        revision=revision,
        modules=modules,
        nbytes=flat.numel() * 2,
        pinned=False,
        flat=flat.view(torch.int16),
    )


def timed(fn: Any, repeats: int) -> float:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5000)
    args = parser.parse_args()
    targets = {name: TargetModule(name, i, o, LAYERS) for name, (i, o) in SHAPES.items()}
    pool = SlotPool(targets, 8, 16, torch.bfloat16, torch.device("cpu"))
    copier = RecordingCopier()
    pool.copier = copier  # type: ignore[assignment]
    rows = []
    for rank in (1, 16):
        staged = staged_adapter(rank)

        def write_then_clear(staged: StagedAdapter = staged) -> None:
            pool.write(3, staged)
            pool.clear(3)

        def write_only(staged: StagedAdapter = staged) -> None:
            pool.write(3, staged)
            for module in pool.modules.values():
                module.forget(3)

        both = timed(write_then_clear, args.repeats)
        write = timed(write_only, args.repeats)
        rows.append([rank, write, both - write, both])
    print_table(
        "Slot write and clear on the one-launch path: host time (us, medians; no kernel runs)",
        ["rank", "write", "clear", "write + clear"],
        rows,
    )
    assert copier.writes and copier.zeros  # the one-launch path was the one timed
    write_results(
        "slot_host",
        {
            "shape": "0.5b (24 layers, 7 linears, slots of rank 16)",
            "repeats": args.repeats,
            "us": [{"rank": r, "write": w, "clear": c, "both": b} for r, w, c, b in rows],
        },
    )


if __name__ == "__main__":
    main()
