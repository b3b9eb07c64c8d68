"""What does serving 8 different adapters in one batch cost, against the base alone and PEFT?

A Qwen2-0.5B-shaped base (24 layers, hidden 896, bf16, random weights: nothing is downloaded)
and 8 PEFT LoRA adapters (rank 16 by default) on the attention projections q/v or on all seven
linear modules. One batch of 8 rows, each row a different adapter, timed three ways in the same
run, interleaved round by round so that machine noise hits all three alike:

- ``base``: the unwrapped base model, no adapters at all;
- ``engine``: ``ResidentEngine.forward`` with 8 adapters resident (one batched LoRA op per
  module: gather path for prefill, wide path for decode);
- ``peft``: one ``PeftModel`` holding the 8 adapters, ``forward(..., adapter_names=[...])``
  (PEFT's mixed-batch inference, which loops over adapters), adapters kept in bf16
  (``autocast_adapter_dtype=False``) like the base: the same bytes as the engine reads;
- ``peft_default``: the same, loaded PEFT's default way, which upcasts bf16 adapters to fp32
  (what a plain ``PeftModel.from_pretrained`` serves).

Two phases: prefill (128 tokens per row, no cache) and decode (one token per row on top of a
128-token KV cache, cropped back after every step). Reports medians, tokens/s, the engine's and
PEFT's cost relative to the base, and engine speedup over PEFT. Floors (issue 3): engine <= 1.25x
base in both phases, >= 2x faster than PEFT in decode. Also times the engine with each LoRA path
forced, to show why prefill gathers and decode goes wide.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mixed_batch.py [--targets all|qv] [--small]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (
    add_device_argument,
    device_info,
    print_table,
    synchronizer,
    write_results,
)

ATTN_QV = ("q_proj", "v_proj")
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_ID = "bench/qwen2-0.5b-shaped"


def qwen2_05b_config(small: bool = False) -> Any:
    """Qwen2-0.5B's shapes (or a much smaller stand-in for a quick check)."""
    from transformers import Qwen2Config

    if small:
        return Qwen2Config(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def large_config() -> Any:
    """A Llama-3-8B-wide base cut to 4 layers (hidden 4096, intermediate 14336, GQA 32/8)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def shape_config(shape: str) -> Any:
    if shape == "large":
        return large_config()
    return qwen2_05b_config(small=shape == "small")


def build_base(
    config: Any, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Any:
    """The base with random weights, initialised on ``device`` (fast for large shapes on a GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def linear_shapes(model: Any, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Module path inside a decoder layer -> (in, out), for the targeted linears."""
    layer = model.model.layers[0]
    shapes = {}
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def write_peft_adapter(
    directory: Path,
    shapes: dict[str, tuple[int, int]],
    num_layers: int,
    *,
    rank: int,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A PEFT LoRA adapter directory (PEFT's own config file, PEFT's key names), random non-zero
    weights; what ``save_pretrained`` writes, without building a PEFT model of the base."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name in shapes})
    LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0
    ).save_pretrained(str(directory))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=gen) * 0.02
            tensors[f"{key}.lora_A.weight"] = a.to(dtype)
            tensors[f"{key}.lora_B.weight"] = b.to(dtype)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call, the device's queue drained
    before and after.

    On a shared machine (2 cores here, other jobs running) wall time includes waiting for a
    core; with one torch thread, CPU time is the work itself and is far steadier. On a GPU only
    wall time means anything.
    """
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    variants: dict[str, Callable[[], Any]],
    repeats: dict[str, int],
    sync: Callable[[], None],
    warmup: int = 1,
) -> dict[str, dict[str, list[float]]]:
    """Run each variant ``warmup`` times, then rounds of one run each, in turn (a variant
    drops out of the rounds once it has its ``repeats``)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": []} for name in variants
    }
    for round_ in range(max(repeats.values())):
        for name, fn in variants.items():
            if round_ >= repeats[name]:
                continue
            wall, cpu = timed(fn, sync)
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
    return samples


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def lora_kernels_config() -> str:
    from engine_plugin import lora_kernels

    return lora_kernels.CONFIG.text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", choices=["all", "qv"], default="all")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--prefill-repeats", type=int, default=5)
    parser.add_argument("--decode-repeats", type=int, default=20)
    parser.add_argument(
        "--peft-repeats", type=int, default=0, help="rounds for PEFT (default: as the others)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", choices=["0.5b", "small", "large"], default="0.5b")
    parser.add_argument("--small", action="store_true", help="same as --shape small")
    parser.add_argument("--no-peft-default", action="store_true")
    parser.add_argument("--no-forced-paths", action="store_true")
    parser.add_argument(
        "--graphs",
        choices=["auto", "on", "off"],
        default="auto",
        help="captured variants: auto = on CUDA only; on = also on CPU (run eagerly, a check)",
    )
    parser.add_argument(
        "--tag", default="", help="appended to the results' name (e.g. a kernel config's run)"
    )
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.small:
        args.shape = "small"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = synchronizer(device)
    graphs = args.graphs == "on" or (args.graphs == "auto" and cuda)

    from peft import PeftModel

    from catalog.pack import import_peft_dir
    from engine_plugin import LocalPackSource, ResidentEngine
    from engine_plugin import layers as lora_layers
    from engine_plugin.graphs import CapturedCall, GraphedDecoder
    from engine_plugin.model_cache import cache_keyword, returned_cache

    targets = ALL_LINEARS if args.targets == "all" else ATTN_QV
    config = shape_config(args.shape)
    print(
        f"building the base ({args.shape}: {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, bf16, {device}) ...",
        flush=True,
    )
    base = build_base(config, device=device)
    shapes = linear_shapes(base, targets)
    names = [f"bench/a{i}" for i in range(args.rows)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    dirs = {
        name: write_peft_adapter(
            tmp / f"a{i}", shapes, config.num_hidden_layers, rank=args.rank, seed=i
        )
        for i, name in enumerate(names)
    }

    source = LocalPackSource()
    for name, directory in dirs.items():
        source.publish(name, import_peft_dir(directory, base_id=BASE_ID))
    engine = ResidentEngine(
        copy.deepcopy(base),
        catalog=source,
        num_slots=args.rows,
        max_rank=args.rank,
        base_id=BASE_ID,
        target_modules=targets,
        device=device,
    )
    for name in names:
        engine.attach(name)

    def load_peft(autocast: bool) -> Any:
        model = PeftModel.from_pretrained(
            copy.deepcopy(base),
            str(dirs[names[0]]),
            adapter_name=names[0],
            autocast_adapter_dtype=autocast,
        )
        for name in names[1:]:
            model.load_adapter(str(dirs[name]), adapter_name=name, autocast_adapter_dtype=autocast)
        return model.to(device).eval()

    peft_kinds = ["peft"] if args.no_peft_default else ["peft", "peft_default"]
    pefts = {kind: load_peft(kind == "peft_default") for kind in peft_kinds}

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.rows, args.prompt), generator=gen)
    step = torch.randint(0, config.vocab_size, (args.rows, 1), generator=gen)
    prompt, step = prompt.to(device), step.to(device)

    # Serving engines compute logits for the last position only in prefill; so do all.
    def base_prefill() -> Any:
        with torch.inference_mode():
            return base(input_ids=prompt, use_cache=False, logits_to_keep=1)

    def engine_prefill() -> Any:
        return engine.forward(prompt, names, use_cache=False, logits_to_keep=1)

    def peft_prefill(kind: str) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return pefts[kind](
                    input_ids=prompt, adapter_names=names, use_cache=False, logits_to_keep=1
                )

        return run

    # Correctness on the benchmark's own shapes before timing anything: the LoRA part of the
    # logits (adapted minus base) of the engine against PEFT's, both in bf16.
    with torch.inference_mode():
        plain = base_prefill().logits[:, -1].float()
        engine_last = engine_prefill().logits[:, -1].float()
        got = engine_last - plain
        want = peft_prefill("peft")().logits[:, -1].float() - plain
    agreement = rel_diff(got, want)
    print(f"engine vs PEFT, LoRA delta of the last logits: relative difference {agreement:.2e}")

    # The base, the engine's model and the PEFT models' base are one model class: one keyword.
    cache_key = cache_keyword(base)
    caches: dict[str, Any] = {}
    with torch.inference_mode():
        caches["base"] = returned_cache(base(input_ids=prompt, use_cache=True))
        caches["engine"] = returned_cache(engine.forward(prompt, names, use_cache=True))
        for kind, model in pefts.items():
            caches[kind] = returned_cache(
                model(input_ids=prompt, adapter_names=names, use_cache=True)
            )

    def decode(kind: str, run: Callable[[Any], Any]) -> Callable[[], Any]:
        def once() -> Any:
            cache = caches[kind]
            out = run(cache)
            cache.crop(-1)  # back to the prompt: every step sees the same context length
            return out

        return once

    def base_step(cache: Any) -> Any:
        with torch.inference_mode():
            return base(input_ids=step, **{cache_key: cache}, use_cache=True)

    def engine_step(cache: Any) -> Any:
        return engine.forward(step, names, **{cache_key: cache}, use_cache=True)

    def peft_step(kind: str) -> Callable[[Any], Any]:
        def run(cache: Any) -> Any:
            with torch.inference_mode():
                return pefts[kind](
                    input_ids=step, adapter_names=names, **{cache_key: cache}, use_cache=True
                )

        return run

    prefill_variants: dict[str, Callable[[], Any]] = {
        "base": base_prefill,
        "engine": engine_prefill,
        **{kind: peft_prefill(kind) for kind in peft_kinds},
    }
    decode_variants: dict[str, Callable[[], Any]] = {
        "base": decode("base", base_step),
        "engine": decode("engine", engine_step),
        **{kind: decode(kind, peft_step(kind)) for kind in peft_kinds},
    }

    checks: dict[str, Any] = {"engine_vs_peft_lora_delta_rel_diff": agreement}
    sessions = contextlib.ExitStack()
    if graphs:
        try:
            # Graph against graph: the bare base and the engine, each step captured once and
            # replayed; prefill captured as one call on a fixed prompt.
            max_len = args.prompt + 8
            base_decoder = GraphedDecoder(base, max_len=max_len, capture=cuda)
            engine_decoder = GraphedDecoder(engine=engine, max_len=max_len, capture=cuda)
            base_session = sessions.enter_context(base_decoder.session(prompt))
            # Leaves the engine's static routing current on this thread, so the prefill capture
            # below routes through it too.
            engine_session = sessions.enter_context(engine_decoder.session(prompt, names))
            checks["graph_engine_prefill_vs_eager_rel_diff"] = rel_diff(
                engine_session.logits, engine_last
            )

            def graph_step(session: Any) -> Callable[[], Any]:
                def once() -> Any:
                    out = session.step(step)
                    session.rewind(1)
                    return out

                return once

            def prefill_call(model: Any) -> Callable[[], torch.Tensor]:
                def run() -> torch.Tensor:
                    with torch.inference_mode():
                        logits: torch.Tensor = model(
                            input_ids=prompt, use_cache=False, logits_to_keep=1
                        ).logits
                        return logits

                return run

            base_prefill_graph = CapturedCall(prefill_call(base), device, capture=cuda)
            engine_prefill_graph = CapturedCall(prefill_call(engine.model), device, capture=cuda)
            prefill_variants["base_graph"] = base_prefill_graph
            prefill_variants["engine_graph"] = engine_prefill_graph
            decode_variants["base_graph"] = graph_step(base_session)
            decode_variants["engine_graph"] = graph_step(engine_session)
            with torch.inference_mode():
                graph_last = engine_prefill_graph()[:, -1].float()
                checks["graph_engine_prefill_call_vs_eager_rel_diff"] = rel_diff(
                    graph_last, engine_last
                )
                eager_next = decode("engine", engine_step)().logits[:, -1]
                graph_next = decode_variants["engine_graph"]()
                checks["graph_engine_decode_vs_eager_rel_diff"] = rel_diff(graph_next, eager_next)
            print("captured vs eager:", json.dumps(checks))

        except Exception as exc:  # a failed capture still leaves the eager figures
            import traceback

            traceback.print_exc()
            checks["graph_error"] = f"{type(exc).__name__}: {exc}"
            for variants in (prefill_variants, decode_variants):
                variants.pop("base_graph", None)
                variants.pop("engine_graph", None)
            sessions.close()
            graphs = False
    results: dict[str, Any] = {
        "config": {
            "shape": args.shape,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "vocab": config.vocab_size,
            "dtype": "bf16",
            "rows": args.rows,
            "prompt_tokens": args.prompt,
            "prefill_logits": "last position only (logits_to_keep=1)",
            "rank": args.rank,
            "targets": list(targets),
            "threads": args.threads,
            # LORACAT_LORA_KERNELS as read (the kernels' launch settings; CUDA only).
            "lora_kernels": lora_kernels_config(),
            "adapter_bytes": engine.host.nbytes // args.rows,
            "base_params": sum(p.numel() for p in base.parameters()),
            "load_average_at_start": os.getloadavg()[0],
            "graphs": graphs,
            "fused_kernel": engine._plan(tuple(range(args.rows))).fused_index is not None,
        },
        "device": device_info(device),
        "checks": checks,
    }
    peft_repeats = args.peft_repeats or None
    # With one thread CPU time is the steadier clock; with more, it also counts the time the
    # OpenMP workers spin or sleep, and on a GPU it means nothing: the floors use wall time.
    clock = "cpu" if args.threads == 1 and not cuda else "wall"
    phases = {
        "prefill": (prefill_variants, args.prefill_repeats, args.rows * args.prompt),
        "decode": (decode_variants, args.decode_repeats, args.rows),
    }
    table = []
    for phase, (variants, repeats, tokens) in phases.items():
        counts = {
            name: (peft_repeats or repeats) if name.startswith("peft") else repeats
            for name in variants
        }
        print(f"timing {phase} ({repeats} rounds) ...", flush=True)
        with torch.inference_mode():
            samples = interleaved(variants, counts, sync)
        phase_result: dict[str, Any] = {"samples_s": samples}
        for which in ("cpu", "wall"):
            med = {k: statistics.median(v[which]) for k, v in samples.items()}
            summary: dict[str, Any] = {
                "median_s": med,
                "tokens_per_s": {k: tokens / v for k, v in med.items()},
                "engine_over_base": med["engine"] / med["base"],
                "peft_over_base": med["peft"] / med["base"],
                "engine_speedup_over_peft": med["peft"] / med["engine"],
            }
            if "peft_default" in med:
                summary["peft_default_over_base"] = med["peft_default"] / med["base"]
                summary["engine_speedup_over_peft_default"] = med["peft_default"] / med["engine"]
            if "engine_graph" in med:
                summary["engine_graph_over_base_graph"] = med["engine_graph"] / med["base_graph"]
                summary["base_graph_speedup"] = med["base"] / med["base_graph"]
                summary["engine_graph_speedup_over_peft"] = med["peft"] / med["engine_graph"]
            phase_result[which] = summary
            if which != clock:
                continue
            for kind in med:
                like = "base_graph" if kind.endswith("_graph") else "base"
                table.append(
                    [
                        phase,
                        which,
                        kind,
                        med[kind] * 1e3,
                        tokens / med[kind],
                        med[kind] / med[like],
                        med["peft"] / med[kind],
                    ]
                )
        results[phase] = phase_result

    if not args.no_forced_paths and not cuda:
        # The same engine with each LoRA path forced, to show why the split is where it is.
        forced: dict[str, dict[str, float]] = {}
        default_wide = lora_layers.WIDE_MAX_TOKENS_PER_ROW
        for path, limit in (("gather", 0), ("wide", 1 << 30)):
            lora_layers.WIDE_MAX_TOKENS_PER_ROW = limit
            try:
                n = max(3, args.prefill_repeats // 2)
                samples = interleaved(
                    {"prefill": engine_prefill, "decode": decode("engine", engine_step)},
                    {"prefill": n, "decode": n},
                    sync,
                )
            finally:
                lora_layers.WIDE_MAX_TOKENS_PER_ROW = default_wide
            forced[path] = {k: statistics.median(v["cpu"]) for k, v in samples.items()}
        results["forced_paths_cpu_median_s"] = forced
        for phase in ("prefill", "decode"):
            base_med = results[phase]["cpu"]["median_s"]["base"]
            for path in ("gather", "wide"):
                t = forced[path][phase]
                row = [phase, "cpu", f"engine, {path} forced", t * 1e3, "", t / base_med, ""]
                table.append(row)
    sessions.close()

    print_table(
        f"{args.rows}-adapter mixed batch, {args.targets} modules, rank {args.rank}, "
        f"{args.shape} shape ({config.num_hidden_layers} layers), {device}, "
        f"{args.threads} thread(s), medians ({clock} time; x base: graph rows against the "
        "base's graph)",
        ["phase", "clock", "variant", "ms", "tokens/s", "x base", "PEFT / this"],
        table,
    )
    measured = {phase: results[phase][clock] for phase in ("prefill", "decode")}
    if cuda:
        limit = 1.15 if args.shape == "large" else 1.25
        floors = {
            f"decode_engine_graph_over_base_graph_le_{limit}": (
                measured["decode"].get("engine_graph_over_base_graph", float("inf")) <= limit
            ),
            "decode_engine_speedup_over_peft_ge_5": (
                measured["decode"]["engine_speedup_over_peft"] >= 5.0
            ),
        }
        if args.shape != "large":
            floors["prefill_engine_graph_over_base_graph_le_1.25"] = (
                measured["prefill"].get("engine_graph_over_base_graph", float("inf")) <= 1.25
            )
            floors["prefill_engine_speedup_over_peft_ge_5"] = (
                measured["prefill"]["engine_speedup_over_peft"] >= 5.0
            )
    else:
        floors = {
            "prefill_engine_over_base_le_1.25": measured["prefill"]["engine_over_base"] <= 1.25,
            "decode_engine_over_base_le_1.25": measured["decode"]["engine_over_base"] <= 1.25,
            "decode_speedup_over_peft_bf16_ge_2": (
                measured["decode"]["engine_speedup_over_peft"] >= 2.0
            ),
        }
    results[f"floors_met_{clock}_time"] = floors
    print(f"\nfloors ({clock}-time medians):", json.dumps(floors))
    suffix = "" if args.targets == "all" else f"_{args.targets}"
    suffix += "" if args.threads == 1 else f"_t{args.threads}"
    suffix += "" if args.shape == "0.5b" else f"_{args.shape}"
    suffix += "" if not cuda else f"_cuda_r{args.rows}"
    suffix += f"_{args.tag}" if args.tag else ""
    write_results(f"mixed_batch{suffix}", results)
    engine.close()


if __name__ == "__main__":
    main()
