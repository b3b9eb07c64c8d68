"""How fast are PEFT import, pack reading and export, against plain safetensors reads?

Builds PEFT adapter directories for a Llama-3.2-3B-shaped base (28 layers, all seven linear
modules, bf16) at two ranks, then times, median of several runs on warm page cache:

- ``import_peft_dir``: PEFT directory -> pack bytes (read file, validate, stack).
- ``read_pack``: full validation of the pack bytes, tensors as zero-copy views.
- ``read_pack + copy``: the same, then every tensor copied out (what attaching costs at least).
- baselines on the same bytes: ``safetensors.torch.load`` (in-memory, copies every tensor) and
  ``safe_open`` + ``get_tensor`` on the pack file and on the per-layer PEFT file.
- ``export_peft_dir``: pack -> PEFT directory (two files, each fsynced and renamed).

Throughput is adapter megabytes (10^6 bytes) per second. Each row's speedup is against the
safetensors baseline doing the same kind of work in the same run: lazy views against lazy views,
copies against copies, import against reading the PEFT file with ``safe_open`` and copying its
tensors, export against ``safetensors.torch.save_file`` of the per-layer tensors (no fsync).
Prints a table and writes ``bench/results/pack.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_pack.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_results
from catalog.pack import export_peft_dir, import_peft_dir, read_pack
from catalog.pack.container import serialize

PREFIX = "base_model.model.model.layers"
# Llama-3.2-3B shapes: module -> (in_features, out_features).
MODULES = {
    "self_attn.q_proj": (3072, 3072),
    "self_attn.k_proj": (3072, 1024),
    "self_attn.v_proj": (3072, 1024),
    "self_attn.o_proj": (3072, 3072),
    "mlp.gate_proj": (3072, 8192),
    "mlp.up_proj": (3072, 8192),
    "mlp.down_proj": (8192, 3072),
}
NUM_LAYERS = 28


def write_peft_dir(path: Path, rank: int) -> int:
    """A PEFT-layout adapter of random bf16 bytes; returns its tensor bytes."""
    rng = random.Random(rank)
    tensors = []
    total = 0
    for layer in range(NUM_LAYERS):
        for module, (in_f, out_f) in MODULES.items():
            for ab, shape in (("A", (rank, in_f)), ("B", (out_f, rank))):
                nbytes = shape[0] * shape[1] * 2
                total += nbytes
                name = f"{PREFIX}.{layer}.{module}.lora_{ab}.weight"
                tensors.append((name, "BF16", shape, [rng.randbytes(nbytes)]))
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(serialize({"format": "pt"}, sorted(tensors)))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-3.2-3B",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(m.split(".")[1] for m in MODULES),
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return total


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page cache, imports, allocator
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_rank(root: Path, rank: int, repeats: int) -> dict[str, object]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load as st_load
    from safetensors.torch import load_file, save_file

    peft_dir = root / f"peft-r{rank}"
    tensor_bytes = write_peft_dir(peft_dir, rank)
    pack_bytes = import_peft_dir(peft_dir)
    pack_path = root / f"r{rank}.pack"
    pack_path.write_bytes(pack_bytes)
    peft_file = peft_dir / "adapter_model.safetensors"

    def read_and_copy() -> None:
        pack = read_pack(pack_bytes)
        for name in pack.tensor_names():
            pack.tensor(name).tobytes()

    def safe_open_all(path: Path, clone: bool) -> Callable[[], None]:
        def run() -> None:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = f.get_tensor(key)
                    if clone:
                        tensor.clone()

        return run

    export_root = root / f"export-r{rank}"
    counter = iter(range(10**6))
    lazy, copied = "safe_open(pack) get_tensor all", "safe_open(pack) get_tensor+clone all"
    peft_copied = "safe_open(PEFT file) get_tensor+clone all"
    peft_saved = "safetensors.torch.save_file(PEFT tensors)"
    peft_tensors = load_file(str(peft_file))
    # (operation, what it does, baseline row it is compared with)
    cases: list[tuple[str, Callable[[], object], str]] = [
        (lazy, safe_open_all(pack_path, clone=False), lazy),
        ("read_pack (validate, views)", lambda: read_pack(pack_bytes), lazy),
        ("safe_open(PEFT file) get_tensor all", safe_open_all(peft_file, clone=False), lazy),
        (copied, safe_open_all(pack_path, clone=True), copied),
        ("read_pack + copy tensors", read_and_copy, copied),
        ("safetensors.torch.load(pack bytes)", lambda: st_load(pack_bytes), copied),
        (peft_copied, safe_open_all(peft_file, clone=True), peft_copied),
        ("import_peft_dir", lambda: import_peft_dir(peft_dir), peft_copied),
        (
            peft_saved,
            lambda: save_file(peft_tensors, str(root / f"saved-{next(counter)}")),
            peft_saved,
        ),
        (
            "export_peft_dir",
            lambda: export_peft_dir(pack_bytes, export_root / str(next(counter))),
            peft_saved,
        ),
    ]
    torch.set_num_threads(1)
    seconds = {name: median_seconds(fn, repeats) for name, fn, _ in cases}
    rows = [
        {
            "operation": name,
            "seconds": seconds[name],
            "mb_per_s": tensor_bytes / seconds[name] / 1e6,
            "baseline": baseline,
            "speedup_vs_baseline": seconds[baseline] / seconds[name],
        }
        for name, _, baseline in cases
    ]
    return {
        "rank": rank,
        "tensor_bytes": tensor_bytes,
        "pack_bytes": len(pack_bytes),
        "peft_tensors": 2 * NUM_LAYERS * len(MODULES),
        "pack_tensors": 2 * len(MODULES),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 1])
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        for rank in args.ranks:
            results.append(bench_rank(Path(tmp), rank, args.repeats))

    for result in results:
        print_table(
            f"rank {result['rank']}: {result['tensor_bytes'] / 1e6:.1f} MB of tensors, "
            f"{result['peft_tensors']} PEFT tensors -> {result['pack_tensors']} pack tensors",
            ["operation", "ms", "MB/s", "speedup", "baseline"],
            [
                [
                    row["operation"],
                    row["seconds"] * 1e3,
                    row["mb_per_s"],
                    row["speedup_vs_baseline"],
                    "-" if row["baseline"] == row["operation"] else row["baseline"],
                ]
                for row in result["rows"]  # type: ignore[attr-defined]
            ],
        )
    write_results(
        "pack",
        {
            "base_shape": "Llama-3.2-3B (28 layers, 7 modules), bf16",
            "repeats": args.repeats,
            "statistic": "median seconds, warm page cache",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
