"""The LoRA kernels' launch settings, module group by module group, on a device.

For each module group of a shape's layer (``q/k/v`` and ``gate/up`` share one launch; ``o`` and
``down`` have their own) and each case (rows x tokens: decode is one token a row, prefill 128),
this times the group's base linears alone and with their LoRA deltas as the engine adds them
(``lora_kernels.add_lora_group_over``), under every ``KernelConfig`` variant, each captured in
a CUDA graph (10 calls a graph, replays timed with CUDA events): a graph removes the launch
cost, so what is timed is the kernels' own latency, which decides the engine's decode step
under ``GraphedDecoder``. Timing the two together is what shows the overlapped variant (the
split shrink on a side stream while the base computes).

Every variant's outputs are first checked against the base plus ``add_lora_reference``. Then
the variants are combined into whole configs (one ``fused_max_k`` threshold, one fused block,
one split chunk, one warp count, overlap or not, for every group) and the one with the least
time over all cases, relative to the base linears, is printed as a ``LORACAT_LORA_KERNELS``
value (and written to ``--best-out``, which ``scripts/gpu_check.sh`` feeds to a second
mixed-batch run).

    python bench/bench_lora_kernels.py --device cuda
    python bench/bench_lora_kernels.py --device cpu --interpret --quick   # tries the harness

On CPU without ``--interpret`` the kernels do not run (the torch path does, whatever the
config): the bench then times only that path and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Triton's interpreter must be chosen before Triton is imported (engine_plugin.lora_kernels).
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from bench.bench_mixed_batch import shape_config
from bench.common import add_device_argument, device_info, print_table, write_results
from engine_plugin import lora_kernels
from engine_plugin.lora_kernels import KernelConfig

#: Calls captured in one graph, and graph replays timed.
CALLS_PER_GRAPH = 10
#: Any fused_max_k above every input width: the fused kernel for every group.
ALWAYS_FUSED = 1 << 30


@dataclass(frozen=True)
class Group:
    """One launch's worth of modules: a shared input width and its outputs' widths."""

    name: str
    k: int
    widths: tuple[int, ...]


@dataclass(frozen=True)
class Case:
    shape: str
    rows: int
    tokens: int

    @property
    def label(self) -> str:
        kind = "decode" if self.tokens == 1 else f"prefill {self.tokens}"
        return f"{self.shape}, {self.rows} rows, {kind}"


def layer_groups(shape: str) -> tuple[int, list[Group]]:
    """The shape's layer count and its layer's module groups, as the engine launches them."""
    config = shape_config(shape)
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    groups = [
        Group("q/k/v", hidden, (config.num_attention_heads * head_dim, kv, kv)),
        Group("o", config.num_attention_heads * head_dim, (hidden,)),
        Group("gate/up", hidden, (inter, inter)),
        Group("down", inter, (hidden,)),
    ]
    return config.num_hidden_layers, groups


def variants(warps: tuple[int, ...] = (4,)) -> Iterator[KernelConfig]:
    """The fused kernel at each block, and the split one at each chunk, after the base or
    overlapped with it, at these warp counts."""
    for num_warps in warps:
        for block_k in (64, 128, 256, 512):
            yield KernelConfig(fused_max_k=ALWAYS_FUSED, fused_block_k=block_k, num_warps=num_warps)
        for chunk, overlap in itertools.product((256, 512, 1024), (0, 1)):
            yield KernelConfig(
                fused_max_k=0, split_chunk=chunk, num_warps=num_warps, overlap=overlap
            )


def variant_kind(config: KernelConfig) -> str:
    """``fused``, ``split`` or ``overlapped`` (split, the shrink beside the base)."""
    if config.fused_max_k:
        return "fused"
    return "overlapped" if config.overlap else "split"


def variant_key(config: KernelConfig) -> str:
    if config.fused_max_k == 0:
        overlapped = " overlapped" if config.overlap else ""
        return f"split chunk={config.split_chunk} warps={config.num_warps}{overlapped}"
    return f"fused block_k={config.fused_block_k} warps={config.num_warps}"


class Timer:
    """Per-call time of a function: under a CUDA graph on a GPU, wall time on CPU."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def __call__(self, fn: Callable[[], None]) -> float:
        fn()  # compiles (Triton), and allocates outside the graph's pool
        if self.device.type != "cuda":
            samples = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            return statistics.median(samples) * 1e6
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS_PER_GRAPH):
                fn()
        for _ in range(3):
            graph.replay()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(self.repeats):
            start.record()
            graph.replay()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) * 1e3 / CALLS_PER_GRAPH)
        return statistics.median(samples)


def group_tensors(
    group: Group, case: Case, rank: int, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, Any]:
    """A pool's slots (one adapter per row, scale columns, a zero slot last) and a batch."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    slots = case.rows

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    lora_as = [rand(slots + 1, rank, group.k, scale=group.k**-0.5) for _ in group.widths]
    lora_bts = [rand(slots + 1, rank, n, scale=rank**-0.5) for n in group.widths]
    for lora_a, lora_bt in zip(lora_as, lora_bts, strict=True):
        lora_a[slots] = 0
        lora_bt[slots] = 0
    pool_scales = torch.ones(slots + 1, len(group.widths), device=device)
    pool_scales[slots] = 0
    total = case.rows * case.tokens
    return {
        "x": rand(total, group.k),
        "outs": [torch.zeros(total, n, device=device, dtype=dtype) for n in group.widths],
        "weights": [rand(n, group.k, scale=group.k**-0.5) for n in group.widths],
        "lora_as": lora_as,
        "lora_bts": lora_bts,
        "scales": [pool_scales[:, g] for g in range(len(group.widths))],
        "index": torch.arange(case.rows, device=device),
    }


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def measure_group(
    group: Group, case: Case, args: argparse.Namespace, timer: Timer, kernels_run: bool
) -> dict[str, Any]:
    """The group's base linears alone, and with the LoRA deltas under every variant, as the
    engine runs them (``add_lora_group_over``: the base's outputs, then or alongside the
    kernels)."""
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" and kernels_run else torch.bfloat16
    t = group_tensors(group, case, args.rank, device, dtype, seed=group.k + case.rows)
    x, index = t["x"], t["index"]

    def base() -> list[torch.Tensor]:
        return [torch.nn.functional.linear(x, weight) for weight in t["weights"]]

    def with_lora(config: KernelConfig | None) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            return lora_kernels.add_lora_group_over(
                base, x, t["lora_as"], t["lora_bts"], t["scales"], index, case.rows, config
            )

        return run

    want = base()
    for g, out in enumerate(want):
        lora_kernels.add_lora_reference(
            x, out, t["lora_as"][g], t["lora_bts"][g], t["scales"][g], index, case.rows
        )
    result: dict[str, Any] = {"base_us": timer(base), "variants": {}}
    if not kernels_run:
        result["variants"]["torch path"] = {"us": timer(with_lora(None)), "rel_err": 0.0}
        return result

    def try_variant(config: KernelConfig) -> None:
        got = with_lora(config)()
        err = max(rel_err(o, w) for o, w in zip(got, want, strict=True))
        entry: dict[str, Any] = {
            "rel_err": err,
            "config": config.text(),
            "kind": variant_kind(config),
        }
        entry["us"] = timer(with_lora(config)) if err <= args.tolerance else float("nan")
        result["variants"][variant_key(config)] = entry

    for config in variants():
        try_variant(config)
    # Other warp counts for the best variant of each kind only (compiles are slow).
    measured = result["variants"].values()
    for kind in ("fused", "split", "overlapped"):
        mine = [v for v in measured if v["kind"] == kind and v["us"] == v["us"]]
        if not mine:
            continue
        best = KernelConfig.parse(min(mine, key=lambda v: v["us"])["config"])
        for num_warps in args.more_warps:
            try_variant(dataclasses.replace(best, num_warps=num_warps))
    return result


def whole_configs(warps: tuple[int, ...]) -> Iterator[KernelConfig]:
    for fused_max_k, from_tokens, block_k, chunk, num_warps, overlap in itertools.product(
        (0, 1024, 2048, 8192, ALWAYS_FUSED),
        (0, 16),
        (64, 128, 256, 512),
        (256, 512, 1024),
        warps,
        (0, 1),
    ):
        yield KernelConfig(
            fused_max_k=fused_max_k,
            split_from_tokens=from_tokens,
            fused_block_k=block_k,
            split_chunk=chunk,
            num_warps=num_warps,
            overlap=overlap,
        )


def step_us(
    config: KernelConfig, case: Case, layers: int, groups: list[Group], measured: dict[str, Any]
) -> float | None:
    """A whole config's time for one step's adapted linears (base and LoRA) in ``case``, from
    the per-group variants (None where a group's variant was not measured, or was wrong)."""
    split_rows = bool(config.split_from_tokens) and case.tokens >= config.split_from_tokens
    total = 0.0
    for group in groups:
        as_variant = (
            KernelConfig(
                fused_max_k=ALWAYS_FUSED,
                fused_block_k=config.fused_block_k,
                num_warps=config.num_warps,
            )
            if group.k <= config.fused_max_k and not split_rows
            else KernelConfig(
                fused_max_k=0,
                split_chunk=config.split_chunk,
                num_warps=config.num_warps,
                overlap=config.overlap,
            )
        )
        entry = measured[group.name]["variants"].get(variant_key(as_variant))
        if entry is None or entry["us"] != entry["us"]:  # not measured, or wrong
            return None
        total += layers * entry["us"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20, help="graph replays timed")
    parser.add_argument("--quick", action="store_true", help="the small shape, two cases")
    parser.add_argument(
        "--interpret", action="store_true", help="on CPU: run the kernels in Triton's interpreter"
    )
    parser.add_argument("--tolerance", type=float, default=3e-2, help="largest relative error")
    parser.add_argument(
        "--best-out", type=Path, help="write LORACAT_LORA_KERNELS=<best config> to this file"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.interpret:
        lora_kernels.INTERPRET_ON_CPU = True
        lora_kernels.OVERLAP_ON_CPU = True  # the overlapped order, on one stream
    kernels_run = lora_kernels.kernel_available(device)
    if args.quick:
        cases = [Case("small", 4, 1), Case("small", 2, 16)]
        args.repeats = min(args.repeats, 3)
        args.more_warps = (8,)
    else:
        cases = [
            Case("0.5b", 8, 1),
            Case("0.5b", 32, 1),
            Case("0.5b", 8, 128),
            Case("large", 8, 1),
            Case("large", 8, 128),
        ]
        args.more_warps = (2, 8)
    timer = Timer(device, args.repeats)
    print(f"device {device}, kernels {'run' if kernels_run else 'do not run (torch path)'}")
    per_case: dict[str, Any] = {}
    for case in cases:
        layers, groups = layer_groups(case.shape)
        measured = {}
        for group in groups:
            started = time.perf_counter()
            measured[group.name] = measure_group(group, case, args, timer, kernels_run)
            print(f"  {case.label}: {group.name} in {time.perf_counter() - started:.1f} s")
        per_case[case.label] = {"case": case, "layers": layers, "groups": groups, "m": measured}
        # After every case, so a run cut short (gpu_check's time limits) keeps what it measured.
        report(per_case, args, kernels_run, final=case == cases[-1])


def report(
    per_case: dict[str, Any], args: argparse.Namespace, kernels_run: bool, final: bool
) -> None:
    """Writes the JSON (and ``--best-out``) for the cases measured so far; prints the tables
    when ``final``."""
    device = torch.device(args.device)
    if final:
        rows = []
        for label, c in per_case.items():
            for group in c["groups"]:
                m = c["m"][group.name]
                for key, v in sorted(m["variants"].items(), key=lambda kv: kv[1]["us"]):
                    ratio = v["us"] / m["base_us"]
                    rows.append([label, group.name, key, m["base_us"], v["us"], ratio])
        clock = "under a CUDA graph" if device.type == "cuda" else "wall time, eager"
        print_table(
            f"Module groups' linears with LoRA, {clock} (us a call; base = the linears alone)",
            ["case", "group", "variant", "base us", "with LoRA us", "x base"],
            rows,
        )
    doc: dict[str, Any] = {
        "device": device_info(device),
        "kernels_run": kernels_run,
        "rank": args.rank,
        "calls_per_graph": CALLS_PER_GRAPH,
        "complete": final,
        "cases": {
            label: {
                "rows": c["case"].rows,
                "tokens": c["case"].tokens,
                "shape": c["case"].shape,
                "layers": c["layers"],
                "groups": {
                    g.name: {"k": g.k, "widths": list(g.widths), **c["m"][g.name]}
                    for g in c["groups"]
                },
            }
            for label, c in per_case.items()
        },
    }
    if kernels_run:
        doc["whole_configs"] = rank_whole_configs(per_case, args, quiet=not final)
        best = doc["whole_configs"]["best"]
        if best and args.best_out:
            args.best_out.write_text(f"LORACAT_LORA_KERNELS={best}\n")
            if final:
                print(f"best config written to {args.best_out}")
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    name = f"lora_kernels{suffix}{'_quick' if args.quick else ''}"
    if final:
        write_results(name, doc)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            write_results(name, doc)


def rank_whole_configs(
    per_case: dict[str, Any], args: argparse.Namespace, quiet: bool
) -> dict[str, Any]:
    """Every whole config's time for a step's linears with LoRA over the base linears', per
    case; the best is
    the least mean of those ratios over the cases (a table unless ``quiet``)."""
    warps = (4, *args.more_warps)
    default = KernelConfig()
    scored = []
    for config in [default, *whole_configs(warps)]:
        ratios = {}
        for label, c in per_case.items():
            with_lora_us = step_us(config, c["case"], c["layers"], c["groups"], c["m"])
            if with_lora_us is None:
                break
            base_us = sum(c["layers"] * c["m"][g.name]["base_us"] for g in c["groups"])
            ratios[label] = with_lora_us / base_us
        else:
            scored.append((statistics.fmean(ratios.values()), config, ratios))
    scored.sort(key=lambda s: s[0])
    by_text = {config.text(): ratios for _, config, ratios in scored}
    best_text = scored[0][1].text() if scored else None
    result = {
        "default": default.text(),
        "best": best_text,
        "ratios": {text: by_text[text] for text in list(by_text)[:10]},
        "default_ratios": by_text.get(default.text()),
    }
    if quiet or best_text is None:
        return result
    default_ratios = by_text.get(default.text(), {})
    print_table(
        f"A step's linears with LoRA over the base linears': default vs best ({best_text})",
        ["case", "default", "best"],
        [
            [label, default_ratios.get(label, float("nan")), by_text[best_text][label]]
            for label in per_case
        ],
    )
    return result


if __name__ == "__main__":
    main()
