"""How close is attaching an adapter from host memory to a raw memcpy of the same bytes?

A Qwen2-0.5B-shaped bf16 base (random weights) in a ``ResidentEngine`` with 8 slots of rank 64
on all seven linear modules, and PEFT adapters of rank 1, 16 and 64 imported into packs and
staged in the engine's host tier (``prefetch``), so that attaching moves bytes from host memory
into a slot and does the bookkeeping, nothing else. Per rank, interleaved round by round,
medians of ``--repeats`` rounds after warm-up:

- ``attach``: ``engine.attach(ref)`` into a free (already zeroed) slot: resolve through an
  in-process catalog, host-tier lookup, slot claim, one ``copy_`` per stacked tensor, binding.
  The adapter is detached (untimed) before each round.
- ``attach + evict``: the same when every slot is taken, so an idle slot (a rank-1 filler,
  least recently used) is zeroed first.
- ``memcpy, per tensor``: ``copy_`` of the same staged tensors into preallocated tensors of
  the same shapes (the baseline of the floor: attach <= 1.5x this).
- ``memcpy, flat``: one ``copy_`` of a buffer of the same total size (the lower bound).
- ``detach``: zeroing the slot.

On a GPU (``--device cuda``) the host tier is pinned, slot writes go through the engine's copy
stream, the memcpy baselines copy pinned host tensors into device tensors, and every timed call
ends with a device synchronization, so it covers the copies it queued. The floors there (issue
15): rank 1 attach <= 150 us, rank 16 attach <= 1.2x the per-tensor memcpy, detach <= 100 us.

Prints a table and writes ``bench/results/attach[_cuda].json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_attach.py [--repeats 20] [--small]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_mixed_batch import (
    ALL_LINEARS,
    BASE_ID,
    build_base,
    linear_shapes,
    qwen2_05b_config,
    write_peft_adapter,
)
from bench.common import (
    add_device_argument,
    device_info,
    print_table,
    synchronizer,
    write_results,
)

RANKS = (1, 16, 64)
sync: Callable[[], None] = lambda: None  # noqa: E731 (set in main for the device)


def timed(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure_rank(
    engine: Any, staged: Any, ref: str, fillers: list[str], repeats: int
) -> tuple[dict[str, float], dict[str, list[float]], int]:
    """Medians and samples of every operation for one adapter, interleaved round by round."""
    tensors = [t for m in staged.modules.values() for t in (m.lora_a, m.lora_bt)]
    device = engine.device
    targets = [torch.empty_like(t, device=device) for t in tensors]
    flat_src = torch.empty(staged.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    flat_dst = torch.empty_like(flat_src, device=device)
    non_blocking = device.type == "cuda"

    def memcpy_per_tensor() -> float:
        def copy() -> None:
            for dst, src in zip(targets, tensors, strict=True):
                dst.copy_(src, non_blocking=non_blocking)

        return timed(copy)

    def memcpy_flat() -> float:
        return timed(lambda: flat_dst.copy_(flat_src, non_blocking=non_blocking))

    def attach_free() -> float:
        engine.detach(ref)
        return timed(lambda: engine.attach(ref))

    def attach_evicting() -> float:
        engine.detach(ref)
        for name in fillers:  # every slot taken, all idle: attach must evict and zero one
            if engine.slots.free_slots == 0:
                break
            engine.attach(name)
        return timed(lambda: engine.attach(ref))

    def detach() -> float:
        elapsed = timed(lambda: engine.detach(ref))
        engine.attach(ref)  # every round starts with the adapter attached
        return elapsed

    variants: dict[str, Callable[[], float]] = {
        "attach": attach_free,
        "attach + evict": attach_evicting,
        "memcpy, per tensor": memcpy_per_tensor,
        "memcpy, flat": memcpy_flat,
        "detach (zero)": detach,
    }
    engine.attach(ref)
    for fn in variants.values():  # warm-up
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(fn())
    # The next rank starts with every slot free, so its
    # evictions zero a rank-1 filler, not a bigger adapter measured before it.
    for name in [*fillers, ref]:
        if any(r["name"] == name for r in engine.stats()["resident"]):
            engine.detach(name)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return medians, samples, len(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--small", action="store_true", help="a tiny model, for a quick check")
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global sync
    sync = synchronizer(args.device)

    from catalog.pack import import_peft_dir
    from engine_plugin import LocalPackSource, ResidentEngine

    config = qwen2_05b_config(args.small)
    print(f"building the base ({config.num_hidden_layers} layers, bf16) ...", flush=True)
    base = build_base(config)
    shapes = linear_shapes(base, ALL_LINEARS)
    tmp = Path(tempfile.mkdtemp(prefix="bench-attach-"))
    source = LocalPackSource()
    for rank in RANKS:
        directory = write_peft_adapter(
            tmp / f"r{rank}", shapes, config.num_hidden_layers, rank=rank, seed=rank
        )
        source.publish(f"bench/r{rank}", import_peft_dir(directory, base_id=BASE_ID))
    # Fillers (distinct bytes, so distinct slots) take the other slots for the eviction case.
    fillers = [f"bench/filler{i}" for i in range(args.slots)]
    for i, name in enumerate(fillers):
        directory = write_peft_adapter(
            tmp / f"filler{i}", shapes, config.num_hidden_layers, rank=1, seed=1000 + i
        )
        source.publish(name, import_peft_dir(directory, base_id=BASE_ID))

    engine = ResidentEngine(
        base,
        catalog=source,
        num_slots=args.slots,
        max_rank=max(RANKS),
        base_id=BASE_ID,
        host_budget_bytes=4 << 30,
        device=args.device,
    )
    for future in engine.prefetch([f"bench/r{r}" for r in RANKS] + fillers):
        future.result()

    results: dict[str, Any] = {
        "config": {
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "dtype": "bf16",
            "targets": list(ALL_LINEARS),
            "num_slots": args.slots,
            "max_rank": max(RANKS),
            "threads": args.threads,
            "repeats": args.repeats,
        },
        "device": device_info(args.device),
        "ranks": {},
    }
    table = []
    for rank in RANKS:
        ref = f"bench/r{rank}"
        staged = engine.host.peek(str(source.resolve(ref).digest))
        assert staged is not None
        med, samples, tensor_count = measure_rank(engine, staged, ref, fillers, args.repeats)
        base_copy = med["memcpy, per tensor"]
        results["ranks"][str(rank)] = {
            "bytes": staged.nbytes,
            "tensors": tensor_count,
            "median_s": med,
            "samples_s": samples,
            "attach_over_memcpy": med["attach"] / base_copy,
            "attach_evict_over_memcpy": med["attach + evict"] / base_copy,
            "memcpy_gb_per_s": staged.nbytes / base_copy / 1e9,
        }
        for name, value in med.items():
            table.append(
                [
                    rank,
                    name,
                    staged.nbytes / 2**20,
                    value * 1e3,
                    staged.nbytes / value / 1e9,
                    value / base_copy,
                ]
            )
    print_table(
        f"attach from host memory vs memcpy ({config.num_hidden_layers} layers, bf16, "
        f"{args.device}, {args.threads} thread(s), medians of {args.repeats})",
        ["rank", "operation", "MiB", "median ms", "GB/s", "x memcpy"],
        table,
    )
    ranks = results["ranks"]
    if args.device == "cpu":
        floors = {
            f"rank{r}_attach_le_1.5x_memcpy": ranks[str(r)]["attach_over_memcpy"] <= 1.5
            for r in RANKS
        }
    else:
        floors = {
            "rank1_attach_le_150us": ranks["1"]["median_s"]["attach"] <= 150e-6,
            "rank16_attach_le_1.2x_memcpy": ranks["16"]["attach_over_memcpy"] <= 1.2,
            "detach_le_100us": all(
                ranks[str(r)]["median_s"]["detach (zero)"] <= 100e-6 for r in RANKS
            ),
        }
    results["floors_met"] = floors
    print("\nfloors:", floors)
    suffix = "" if args.device == "cpu" else "_cuda"
    write_results(f"attach{suffix}{'_small' if args.small else ''}", results)
    engine.close()


if __name__ == "__main__":
    main()
