"""Packed vs unpacked MoE LoRA loading: how long until every expert's LoRA sits in host buffers?

The catalog side of issue 5's benchmark (the engine-slot version comes with the engine's MoE
layers): it isolates the format. For 8, 64 and 128 experts it writes one MoE adapter in the
per-expert PEFT layout (``...layers.{l}.mlp.experts.{e}.gate_proj.lora_A.weight``: the layout of
older checkpoints and of vLLM, one A/B pair per expert and projection: tens of thousands of small
tensors) and the same adapter as a pack (``import_peft_dir``: a few dozen tensors stacked
``[L, E, r, in]`` / ``[L, E, r, out]``, ``lora_B`` rank-major since pack format 2). Then, from
files in page cache (a warm-up pass reads each first) into host buffers preallocated once per
module in the layout an engine's slots hold (``[L, E, r, in]`` / ``[L, E, r, out]``, plus
``[L, r, in]`` / ``[L, r, out]`` for the dense attention modules; each PEFT ``lora_B`` goes in
transposed), it times, median of several rounds
(each round runs every loader once, so that load from other processes hits them alike):

- ``packed read_pack``: mmap the pack, ``read_pack`` (validates header and manifest), one copy
  per stacked tensor into its buffer. This is what the engine does.
- ``packed safe_open``: the same pack through ``safetensors.safe_open`` + ``get_tensor`` + copy
  (any safetensors reader gets the win; it is the format, not our reader).
- ``unpacked safe_open``: ``safe_open`` on the PEFT file, for every key: parse it into
  (layer, module, expert, A/B), ``get_tensor``, copy into ``buffer[l, e]``.
- ``unpacked load_file``: ``safetensors.torch.load_file`` (all tensors at once), then the same
  parse and copy per key.
- ``unpacked raw offsets``: the cheapest per-expert loader we could write (header JSON once, one
  numpy copy per key straight from the mmap): a lower bound for the unpacked layout, reported
  beside the headline rather than in it.

Every loader fills the same buffers, checked equal after the run. Speedups are each unpacked
loader's time over ``packed read_pack`` in the same run; the headline (floor: >= 10x at 64
experts) divides the faster of the two safetensors unpacked loaders by ``packed read_pack``.
Prints a table and writes ``bench/results/moe_pack.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_moe_pack.py [--layers 32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import mmap
import random
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_results
from catalog.pack import import_peft_dir, read_pack
from catalog.pack.container import serialize

PREFIX = "base_model.model.model.layers"
EXPERT_COUNTS = (8, 64, 128)
HIDDEN = 256
EXPERT_INTERMEDIATE = 128
RANK = 8
# Per-expert projections (module inside the experts list) -> (in, out).
EXPERT_PROJECTIONS = {
    "gate_proj": (HIDDEN, EXPERT_INTERMEDIATE),
    "up_proj": (HIDDEN, EXPERT_INTERMEDIATE),
    "down_proj": (EXPERT_INTERMEDIATE, HIDDEN),
}
# Dense modules, as an MoE adapter usually also adapts attention.
DENSE = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN // 4)}
DTYPE = torch.bfloat16

Buffers = dict[str, tuple[torch.Tensor, torch.Tensor]]


def write_peft_dir(path: Path, layers: int, experts: int) -> tuple[int, int]:
    """A per-expert PEFT adapter of random bf16 bytes; returns (tensors, tensor bytes)."""
    rng = random.Random(experts)
    tensors = []
    total = 0

    def add(module_path: str, in_f: int, out_f: int) -> None:
        nonlocal total
        for ab, shape in (("A", (RANK, in_f)), ("B", (out_f, RANK))):
            nbytes = shape[0] * shape[1] * 2
            total += nbytes
            name = f"{module_path}.lora_{ab}.weight"
            tensors.append((name, "BF16", shape, [rng.randbytes(nbytes)]))

    for layer in range(layers):
        for module, (in_f, out_f) in DENSE.items():
            add(f"{PREFIX}.{layer}.{module}", in_f, out_f)
        for e in range(experts):
            for proj, (in_f, out_f) in EXPERT_PROJECTIONS.items():
                add(f"{PREFIX}.{layer}.mlp.experts.{e}.{proj}", in_f, out_f)
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(serialize({"format": "pt"}, sorted(tensors)))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-moe",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return len(tensors), total


def allocate(layers: int, experts: int) -> Buffers:
    """Host buffers for every module, as the pack stacks them (allocated once, reused)."""
    buffers: Buffers = {}
    for module, (in_f, out_f) in DENSE.items():
        buffers[module] = (
            torch.empty(layers, RANK, in_f, dtype=DTYPE),
            torch.empty(layers, RANK, out_f, dtype=DTYPE),
        )
    for proj, (in_f, out_f) in EXPERT_PROJECTIONS.items():
        buffers[f"mlp.experts.{proj}"] = (
            torch.empty(layers, experts, RANK, in_f, dtype=DTYPE),
            torch.empty(layers, experts, RANK, out_f, dtype=DTYPE),
        )
    return buffers


# ---------------------------------------------------------------- loaders


def load_packed_read_pack(pack_path: Path, buffers: Buffers) -> None:
    with open(pack_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        pack = read_pack(view)
        for module, (a_buf, b_buf) in buffers.items():
            a, b, _ = pack.stored_tensors(module)  # lora_B rank-major: the buffers' layout
            for buf, tensor in ((a_buf, a), (b_buf, b)):
                # One memcpy per stacked tensor, from the page cache into the buffer.
                np.copyto(
                    buf.view(torch.int16).numpy(),
                    np.frombuffer(tensor.data, dtype=np.int16).reshape(buf.shape),
                )
        # Every view into the map must be gone before it closes.
        del pack, a, b, tensor
        view.release()


def load_packed_safe_open(pack_path: Path, buffers: Buffers) -> None:
    with safe_open(str(pack_path), framework="pt") as f:
        for module, (a_buf, b_buf) in buffers.items():
            a_buf.copy_(f.get_tensor(f"layers.{module}.lora_A"))
            b_buf.copy_(f.get_tensor(f"layers.{module}.lora_B"))


def _place(key: str) -> tuple[str, int, int, int | None]:
    """Where one per-expert PEFT tensor goes, (module, A=0/B=1, layer, expert): what an engine's
    loader must work out for every key of the unpacked layout."""
    body, _, side = key[len(PREFIX) + 1 :].rpartition(".lora_")
    layer_text, _, path = body.partition(".")
    parts = path.split(".")
    index = 0 if side == "A.weight" else 1
    if len(parts) == 4 and parts[2].isdigit():  # mlp.experts.{e}.gate_proj
        return f"{parts[0]}.{parts[1]}.{parts[3]}", index, int(layer_text), int(parts[2])
    return path, index, int(layer_text), None


def _destination(buffers: Buffers, key: str) -> torch.Tensor:
    module, index, layer, expert = _place(key)
    stacked = buffers[module][index]
    return stacked[layer] if expert is None else stacked[layer, expert]


def _put(buffers: Buffers, key: str, tensor: torch.Tensor) -> None:
    """Copy one PEFT tensor into its place (``lora_B`` ``[out, r]`` goes in transposed)."""
    _destination(buffers, key).copy_(tensor if ".lora_A." in key else tensor.t())


def load_unpacked_safe_open(peft_path: Path, buffers: Buffers) -> None:
    with safe_open(str(peft_path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
            _put(buffers, key, f.get_tensor(key))


def load_unpacked_load_file(peft_path: Path, buffers: Buffers) -> None:
    for key, tensor in load_file(str(peft_path / "adapter_model.safetensors")).items():
        _put(buffers, key, tensor)


def load_unpacked_raw_offsets(peft_path: Path, buffers: Buffers) -> None:
    """The cheapest per-expert loader we could write: header JSON parsed once, then one numpy
    copy per key straight from the mmap at its offsets (no tensor objects, no validation)."""
    with (
        open(peft_path / "adapter_model.safetensors", "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
    ):
        (length,) = struct.unpack_from("<Q", mm)
        header = json.loads(mm[8 : 8 + length])
        header.pop("__metadata__", None)
        base = 8 + length
        arrays = {
            module: (a.view(torch.int16).numpy(), b.view(torch.int16).numpy())
            for module, (a, b) in buffers.items()
        }
        for key, spec in header.items():
            module, index, layer, expert = _place(key)
            stacked = arrays[module][index]
            dst = stacked[layer] if expert is None else stacked[layer, expert]
            begin, end = spec["data_offsets"]
            src = np.frombuffer(mm, dtype=np.int16, count=(end - begin) // 2, offset=base + begin)
            # lora_B is [out, r] in the file and [r, out] in the buffer.
            np.copyto(dst, src.reshape(dst.shape) if index == 0 else src.reshape(dst.shape[::-1]).T)
            del src


LOADERS: dict[str, tuple[str, Callable[[Path, Buffers], None]]] = {
    "packed read_pack": ("pack", load_packed_read_pack),
    "packed safe_open": ("pack", load_packed_safe_open),
    "unpacked safe_open": ("peft", load_unpacked_safe_open),
    "unpacked load_file": ("peft", load_unpacked_load_file),
    "unpacked raw offsets": ("peft", load_unpacked_raw_offsets),
}
#: The loaders issue 5's floor is about: the per-expert layout as safetensors readers load it.
STANDARD_UNPACKED = ("unpacked safe_open", "unpacked load_file")
BASELINE = "packed read_pack"


def run(layers: int, experts: int, repeats: int, root: Path) -> dict[str, object]:
    peft_dir = root / f"peft-{experts}"
    count, nbytes = write_peft_dir(peft_dir, layers, experts)
    start = time.perf_counter()
    pack_bytes = import_peft_dir(peft_dir, num_experts=experts)
    import_s = time.perf_counter() - start
    pack_path = root / f"moe-{experts}.pack"
    pack_path.write_bytes(pack_bytes)
    pack_tensors = len(read_pack(pack_bytes).tensor_names())
    paths = {"pack": pack_path, "peft": peft_dir}

    buffers = {name: allocate(layers, experts) for name in LOADERS}
    samples: dict[str, list[float]] = {name: [] for name in LOADERS}
    for name, (kind, loader) in LOADERS.items():
        loader(paths[kind], buffers[name])  # warm-up: page cache, lazy imports
    # Round robin, so that load from other processes on this machine hits every loader alike.
    for _ in range(repeats):
        for name, (kind, loader) in LOADERS.items():
            start = time.perf_counter()
            loader(paths[kind], buffers[name])
            samples[name].append(time.perf_counter() - start)
    reference = buffers[BASELINE]
    for name, filled in buffers.items():
        for module, pair in filled.items():
            for side, got, want in zip("AB", pair, reference[module], strict=True):
                if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
                    raise AssertionError(f"{name} filled {module} lora_{side} differently")
    results: dict[str, dict[str, float]] = {
        name: {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "mb_per_s": nbytes / statistics.median(times) / 1e6,
            "n": len(times),
        }
        for name, times in samples.items()
    }
    baseline = results[BASELINE]["median_s"]
    for r in results.values():
        r["slowdown_vs_packed"] = r["median_s"] / baseline
    fastest_unpacked = min(results[n]["median_s"] for n in STANDARD_UNPACKED)
    return {
        "experts": experts,
        "layers": layers,
        "peft_tensors": count,
        "pack_tensors": pack_tensors,
        "lora_bytes": nbytes,
        "pack_bytes": len(pack_bytes),
        "import_peft_dir_s": import_s,
        "loaders": results,
        "speedup_packed_vs_fastest_unpacked": fastest_unpacked / baseline,
        "speedup_packed_vs_raw_offsets": results["unpacked raw offsets"]["median_s"] / baseline,
        "speedup_packed_vs_fastest_unpacked_min": min(
            results[n]["min_s"] for n in STANDARD_UNPACKED
        )
        / results[BASELINE]["min_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERT_COUNTS))
    args = parser.parse_args()
    torch.set_num_threads(1)

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-moe-pack-") as tmp:
        for experts in args.experts:
            runs.append(run(args.layers, experts, args.repeats, Path(tmp)))
            # Keep the disk footprint to one size at a time.
            for path in Path(tmp).iterdir():
                if path.is_dir():
                    for f in path.iterdir():
                        f.unlink()
                    path.rmdir()
                else:
                    path.unlink()

    rows = []
    for r in runs:
        for name, stats in r["loaders"].items():  # type: ignore[attr-defined]
            rows.append(
                [
                    f"E={r['experts']}",
                    name,
                    r["pack_tensors"] if name.startswith("packed") else r["peft_tensors"],
                    stats["median_s"] * 1e3,
                    stats["mb_per_s"],
                    stats["slowdown_vs_packed"],
                ]
            )
    print_table(
        f"MoE LoRA load into preallocated host buffers ({args.layers} layers, hidden {HIDDEN}, "
        f"expert intermediate {EXPERT_INTERMEDIATE}, rank {RANK}, bf16; page cache; median of "
        f"{args.repeats})",
        ["experts", "loader", "tensors", "ms", "MB/s", "x packed time"],
        rows,
    )
    print_table(
        "packed read_pack speedup over the fastest safetensors unpacked loader (floor: >= 10x "
        "at E=64), and over hand-rolled raw offsets",
        ["experts", "LoRA MB", "PEFT tensors", "pack tensors", "speedup", "vs raw", "import s"],
        [
            [
                r["experts"],
                r["lora_bytes"] / 1e6,  # type: ignore[operator]
                r["peft_tensors"],
                r["pack_tensors"],
                r["speedup_packed_vs_fastest_unpacked"],
                r["speedup_packed_vs_raw_offsets"],
                r["import_peft_dir_s"],
            ]
            for r in runs
        ],
    )
    write_results(
        "moe_pack",
        {
            "config": {
                "layers": args.layers,
                "hidden": HIDDEN,
                "expert_intermediate": EXPERT_INTERMEDIATE,
                "rank": RANK,
                "dtype": "bf16",
                "repeats": args.repeats,
                "dense_modules": sorted(DENSE),
                "expert_projections": sorted(EXPERT_PROJECTIONS),
                "baseline": BASELINE,
            },
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
