"""Packed vs unpacked MoE LoRA, loaded into the resident engine's expert slots.

Issue 5's benchmark, engine side (``bench_moe_pack`` isolates the format into host buffers). A
transformers 5 Mixtral-shaped base (32 layers, hidden 256, expert intermediate 128, top-2, bf16;
weights left uninitialised: nothing here reads them) wrapped by ``ResidentEngine`` with expert
slots ``[L, E, S + 1, R, in]``. One adapter of rank 8 on q/v and on every expert's gate, up and
down projection, written in the per-expert PEFT layout (``...layers.{l}.mlp.experts.{e}.
gate_proj.lora_A.weight``: what older checkpoints and vLLM use, ``6 * L * E`` expert tensors)
and imported once into a pack (a few dozen stacked tensors). For 8, 64 and 128 experts, each
timed run fills one slot from scratch:

page cache (files read each run; a warm-up pass first)
- ``packed attach``: ``engine.attach(ref)`` with a source that maps the pack file: fetch,
  ``read_pack`` (validation), staging (finite check; ``lora_B`` is stored rank-major, the
  slots' layout, since pack format 2), one copy per staged tensor into the slot. The host
  tier is off (budget 0), so every run does all of it.
- ``unpacked 1-by-1 (safe_open)``: what an engine without packing does: ``safe_open`` the PEFT
  file and, for every key, work out (layer, module, expert, A/B), ``get_tensor`` and copy it
  into its place in the slot (``B`` transposed into the slot's ``[r, out]`` rows).
- ``unpacked 1-by-1 (load_file)``: the same with ``load_file`` reading all tensors first.
- ``unpacked 1-by-1 (raw views)``: the cheapest per-key loader we could write: the header
  parsed once, each key copied into the slot straight from a view of the mapped file. A lower
  bound for the unpacked layout, reported beside the headline.
- ``unpacked restack``: ``load_file``, then ``torch.stack`` per module and one copy each: an
  unpacked engine that packs at load time. A reference, not in the headline.

catalog over gRPC (``loracat serve`` as a child process on loopback, file store, its NVMe pack
cache warm; every run fetches again)
- ``packed attach``: ``engine.attach(ref)`` on a ``CatalogClient``: resolve, streamed fetch
  with the digest checked as the chunks arrive, staging (views into the fetched buffer),
  copy.
- ``unpacked 1-by-1 (load)`` / ``(raw views)``: the catalog serves packs only, so the transfer
  leg is the same gRPC fetch of this adapter's bytes (the pack: the same tensor bytes as the
  PEFT file, a smaller header), then ``safetensors.torch.load`` of the PEFT file's bytes (or raw
  views of them) and the per-key copies.
- ``transfer only``: the gRPC fetch alone, the part of both paths that packing cannot change.

colocated catalog (the same ``loracat serve`` child process and loaders, issue 14): the client
reads each pack straight from the catalog's NVMe tier (a lease over gRPC, the chunks from its
LMDB environment read-only, each checked against its checksum, copied once into the returned
buffer; with this bench's ``file://`` store, the store's file mapped read-only, kept mapped
between reads and checked on every read), so ``transfer only`` is that read, which feeds the
unpacked loaders too. A packed attach that gets the same kept map back reuses the staging it
made over it (``engine_plugin.kept_stagings``; the read's checks still run).

Headline: the fastest safetensors 1-by-1 unpacked loader over ``packed attach``, per setting, in
wall-clock medians (CPU time beside it, steadier on this shared machine: this process's, plus
the server process's over gRPC, read from ``/proc``);
floors: >= 10x at 64 experts (issue 5 from the page cache, issue 14 through a colocated
catalog). Every loader's slot is checked equal to the packed one
after the runs. Prints a table and writes ``bench/results/moe_attach.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_moe_attach.py [--repeats 5] [--experts 8 64]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save_file

from bench.common import (
    add_device_argument,
    device_info,
    print_table,
    synchronizer,
    write_results,
)
from catalog.model import Ref, Revision
from catalog.pack import import_peft_dir

EXPERT_COUNTS = (8, 64, 128)
LAYERS = 32
HIDDEN = 256
EXPERT_INTERMEDIATE = 128
HEADS, KV_HEADS = 4, 1
RANK = 8
DTYPE = torch.bfloat16
BASE_ID = "bench/moe-attach"
PREFIX = "base_model.model.model.layers"
EXPERT_PROJECTIONS = {
    "gate_proj": (HIDDEN, EXPERT_INTERMEDIATE),
    "up_proj": (HIDDEN, EXPERT_INTERMEDIATE),
    "down_proj": (EXPERT_INTERMEDIATE, HIDDEN),
}
DENSE = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN // HEADS * KV_HEADS),
}
#: The loader list's settings: the pack file in the page cache, a catalog streaming it over
#: gRPC, and a colocated catalog whose NVMe tier this process reads directly.
SETTINGS = ("page_cache", "grpc", "colocated")
#: The transfer-only row of each catalog setting (keyed by ``colocated``).
TRANSFER = {False: "transfer only (gRPC fetch)", True: "transfer only (colocated read)"}
#: The slot a loader fills: the packed attach takes slot 0 (the lowest free), the unpacked
#: loaders write slot 1 directly (never claimed, never read by a forward here).
PACKED_SLOT, UNPACKED_SLOT = 0, 1


#: Where the engines run: ``--device``.
DEVICE = "cpu"


def build_engine(experts: int, catalog: Any, host_budget: int = 0) -> Any:
    """The resident engine on an uninitialised Mixtral-shaped bf16 base (fast to build)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from engine_plugin import ResidentEngine

    config = MixtralConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=EXPERT_INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    model.to_empty(device=DEVICE)
    return ResidentEngine(
        model,
        catalog=catalog,
        num_slots=2,
        max_rank=RANK,
        base_id=BASE_ID,
        target_modules=("q_proj", "v_proj", "experts"),
        host_budget_bytes=host_budget,
        device=DEVICE,
    )


def write_peft_dir(path: Path, experts: int, seed: int) -> tuple[int, int]:
    """A per-expert PEFT adapter (random normal bf16); returns (tensors, tensor bytes)."""
    from peft import LoraConfig

    path.mkdir(parents=True)
    LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
    ).save_pretrained(str(path))
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, in_f: int, out_f: int) -> None:
        tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=gen) * 0.05).to(DTYPE)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=gen) * 0.05).to(DTYPE)

    for layer in range(LAYERS):
        for module, (in_f, out_f) in DENSE.items():
            add(f"{PREFIX}.{layer}.{module}", in_f, out_f)
        for e in range(experts):
            for proj, (in_f, out_f) in EXPERT_PROJECTIONS.items():
                add(f"{PREFIX}.{layer}.mlp.experts.{e}.{proj}", in_f, out_f)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


class FilePackSource:
    """A pack source whose fetch maps the pack file (page cache) on every call, as
    ``safe_open`` maps the PEFT file: read-only, no copy until staging copies out."""

    def __init__(self, name: str, pack_path: Path) -> None:
        from engine_plugin import LocalPackSource

        self._catalog = LocalPackSource()
        self._catalog.publish(name, pack_path.read_bytes())
        self._path = pack_path

    def resolve(self, ref: Ref | str) -> Revision:
        return self._catalog.resolve(ref)

    def fetch(self, ref: Ref | Revision | str) -> memoryview:
        with open(self._path, "rb") as f:
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


# ---------------------------------------------------------------- unpacked loaders


class SlotViews:
    """Where each per-expert PEFT key lands in the engine's slot ``slot`` (what an unpacked
    engine works out per key: layer, module, expert, A or B)."""

    def __init__(self, engine: Any, slot: int) -> None:
        self.slot = slot
        self.modules = {name: engine.pool.modules[name] for name in engine.pool.modules}

    def destination(self, key: str) -> tuple[torch.Tensor, bool]:
        """(slot view, whether the source is ``lora_B`` and goes in transposed)."""
        body, _, side = key[len(PREFIX) + 1 :].rpartition(".lora_")
        layer_text, _, path = body.partition(".")
        layer = int(layer_text)
        parts = path.split(".")
        is_b = side == "B.weight"
        if len(parts) == 4 and parts[2].isdigit():  # mlp.experts.{e}.gate_proj
            slots = self.modules[f"{parts[0]}.{parts[1]}.{parts[3]}"]
            stacked = slots.lora_bt if is_b else slots.lora_a
            return stacked[layer, int(parts[2]), self.slot, :RANK], is_b
        slots = self.modules[path]
        stacked = slots.lora_bt if is_b else slots.lora_a
        return stacked[layer, self.slot, :RANK], is_b

    def put(self, key: str, tensor: torch.Tensor) -> None:
        dest, is_b = self.destination(key)
        dest.copy_(tensor.t() if is_b else tensor)


def unpacked_safe_open(peft_file: Path, views: SlotViews) -> None:
    with safe_open(str(peft_file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
            views.put(key, f.get_tensor(key))


def unpacked_load_file(peft_file: Path, views: SlotViews) -> None:
    for key, tensor in load_file(str(peft_file)).items():
        views.put(key, tensor)


def unpacked_restack(peft_file: Path, views: SlotViews) -> None:
    """Pack at load time: group the keys per module, stack, one (transposing) copy each."""
    tensors = load_file(str(peft_file))
    groups: dict[tuple[str, bool], list[tuple[int, int, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        body, _, side = key[len(PREFIX) + 1 :].rpartition(".lora_")
        layer_text, _, path = body.partition(".")
        parts = path.split(".")
        expert = int(parts[2]) if len(parts) == 4 and parts[2].isdigit() else -1
        module = f"{parts[0]}.{parts[1]}.{parts[3]}" if expert >= 0 else path
        groups.setdefault((module, side == "B.weight"), []).append(
            (int(layer_text), expert, tensor)
        )
    for (module, is_b), items in groups.items():
        items.sort(key=lambda item: item[:2])
        slots = views.modules[module]
        stacked = torch.stack([t for _, _, t in items])
        if slots.target.num_experts:
            stacked = stacked.view(LAYERS, slots.target.num_experts, *stacked.shape[1:])
            dest = (slots.lora_bt if is_b else slots.lora_a)[:, :, views.slot, :RANK]
        else:
            stacked = stacked.view(LAYERS, *stacked.shape[1:])
            dest = (slots.lora_bt if is_b else slots.lora_a)[:, views.slot, :RANK]
        dest.copy_(stacked.transpose(-1, -2) if is_b else stacked)


def unpacked_from_bytes(peft_bytes: bytes | memoryview, views: SlotViews) -> None:
    for key, tensor in load(bytes(peft_bytes)).items():
        views.put(key, tensor)


def unpacked_views(peft_bytes: bytes | memoryview, views: SlotViews) -> None:
    """The cheapest 1-by-1 loader we could write: the header's JSON parsed once (no checks),
    then each key copied into the slot straight from a numpy view of the file's bytes."""
    (length,) = struct.unpack_from("<Q", peft_bytes)
    header = json.loads(bytes(peft_bytes[8 : 8 + length]))
    header.pop("__metadata__", None)
    start = 8 + length
    for key, spec in header.items():
        begin, end = spec["data_offsets"]
        raw = np.frombuffer(
            peft_bytes, dtype=np.int16, count=(end - begin) // 2, offset=start + begin
        )
        views.put(key, torch.from_numpy(raw.reshape(spec["shape"])).view(DTYPE))


def mapped(path: Path) -> memoryview:
    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


# ---------------------------------------------------------------- runs


def slots_equal(engine: Any, a: int, b: int) -> bool:
    for slots in engine.pool.modules.values():
        axis = slots.slot_axis
        for stacked in (slots.lora_a, slots.lora_bt):
            if not torch.equal(stacked.select(axis, a), stacked.select(axis, b)):
                return False
    return True


Samples = dict[str, list[tuple[float, float]]]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_rounds(
    loaders: dict[str, Callable[[], Any]],
    repeats: int,
    after: dict[str, Callable[[], Any]],
    server_pid: int | None = None,
) -> Samples:
    """One warm-up call each, then ``repeats`` rounds, each calling every loader once (so that
    load from other processes on this machine hits them alike): (wall, CPU) seconds, CPU being
    this process's plus, given ``server_pid``, that process's (in clock ticks of 10 ms: a
    median over rounds smooths it). ``after`` runs untimed. On this shared 2-core machine wall
    time includes waiting for a core; CPU time (all threads, gRPC's included) is the work
    itself and much steadier."""

    def cpu_now() -> float:
        return time.process_time() + (0.0 if server_pid is None else process_cpu_s(server_pid))

    samples: Samples = {name: [] for name in loaders}
    sync = synchronizer(DEVICE)
    for round_ in range(repeats + 1):
        for name, loader in loaders.items():
            sync()
            wall, cpu = time.perf_counter(), cpu_now()
            loader()
            sync()  # the copies it queued on a GPU count
            elapsed = (time.perf_counter() - wall, cpu_now() - cpu)
            if name in after:
                after[name]()
            if round_:
                samples[name].append(elapsed)
    return samples


def summarize(samples: Samples, baseline: str) -> dict[str, dict[str, float]]:
    base_wall = statistics.median(w for w, _ in samples[baseline])
    base_cpu = statistics.median(c for _, c in samples[baseline])
    out = {}
    for name, times in samples.items():
        wall = statistics.median(w for w, _ in times)
        cpu = statistics.median(c for _, c in times)
        out[name] = {
            "median_s": wall,
            "min_s": min(w for w, _ in times),
            "cpu_median_s": cpu,
            "n": len(times),
            "x_packed_time": wall / base_wall,
            "x_packed_cpu": cpu / base_cpu,
        }
    return out


def run_page_cache(experts: int, paths: dict[str, Path], repeats: int) -> dict[str, Any]:
    name = "bench/moe"
    engine = build_engine(experts, FilePackSource(name, paths["pack"]))
    views = SlotViews(engine, UNPACKED_SLOT)
    peft_file = paths["peft"] / "adapter_model.safetensors"
    timings: list[dict[str, float]] = []

    def attach() -> None:
        before = dict(engine.timings)
        engine.attach(name)
        timings.append({k: engine.timings[k] - before[k] for k in before})

    loaders = {
        "packed attach": attach,
        "unpacked 1-by-1 (safe_open)": lambda: unpacked_safe_open(peft_file, views),
        "unpacked 1-by-1 (load_file)": lambda: unpacked_load_file(peft_file, views),
        "unpacked 1-by-1 (raw views)": lambda: unpacked_views(mapped(peft_file), views),
        "unpacked restack": lambda: unpacked_restack(peft_file, views),
    }
    samples = time_rounds(loaders, repeats, {"packed attach": lambda: engine.detach(name)})
    engine.attach(name)
    if engine.stats()["resident"][0]["slot"] != PACKED_SLOT or not slots_equal(
        engine, PACKED_SLOT, UNPACKED_SLOT
    ):
        raise AssertionError("the unpacked loaders filled the slot differently")
    engine.close()
    results = summarize(samples, "packed attach")
    components = {
        k: statistics.median(t[k] for t in timings[1:]) for k in ("fetch_s", "stage_s", "copy_s")
    }
    return {"loaders": results, "packed_components": components}


def run_grpc(
    experts: int,
    paths: dict[str, Path],
    repeats: int,
    root: Path,
    digest: str,
    colocated: bool = False,
) -> dict[str, Any]:
    """The catalog settings: bytes over the gRPC stream, or (``colocated``) read by this
    process straight from the catalog's NVMe tier under a lease (``catalog.client.colocated``);
    every loader, the unpacked ones included, is fed by that same client."""
    from catalog.client import CatalogClient
    from tests.servers import serve_subprocess

    name = "bench/moe"
    label = "colocated" if colocated else "grpc"
    store = (root / f"store-{experts}-{label}").as_uri()
    serve_args = ("--digest", digest)
    with serve_subprocess(root / f"catalog-{experts}-{label}", store, extra_args=serve_args) as (
        server,
        address,
    ):
        client = CatalogClient(address, colocated=colocated)
        try:
            client.push(name, paths["pack"].read_bytes())
            engine = build_engine(experts, client)
            views = SlotViews(engine, UNPACKED_SLOT)
            peft_bytes = (paths["peft"] / "adapter_model.safetensors").read_bytes()
            revision = client.resolve(name)
            timings: list[dict[str, float]] = []

            def attach() -> None:
                before = dict(engine.timings)
                engine.attach(name)
                timings.append({k: engine.timings[k] - before[k] for k in before})

            def unpacked(load_peft: Callable[[bytes, SlotViews], None]) -> None:
                client.fetch(revision)  # the transfer leg (see the module docstring)
                load_peft(peft_bytes, views)

            loaders = {
                "packed attach": attach,
                "unpacked 1-by-1 (load)": lambda: unpacked(unpacked_from_bytes),
                "unpacked 1-by-1 (raw views)": lambda: unpacked(unpacked_views),
                TRANSFER[colocated]: lambda: client.fetch(revision),
            }
            samples = time_rounds(
                loaders, repeats, {"packed attach": lambda: engine.detach(name)}, server.pid
            )
            engine.attach(name)
            if not slots_equal(engine, PACKED_SLOT, UNPACKED_SLOT):
                raise AssertionError("the unpacked loader filled the slot differently")
            path = client.colocated
            if colocated and (path is None or path.reason or path.counters["fallbacks"]):
                raise AssertionError(
                    f"the colocated setting read over gRPC: {path and path.reason}"
                )
            engine.close()
        finally:
            client.close()
    components = {
        k: statistics.median(t[k] for t in timings[1:]) for k in ("fetch_s", "stage_s", "copy_s")
    }
    return {"loaders": summarize(samples, "packed attach"), "packed_components": components}


def run(experts: int, repeats: int, root: Path, digest: str) -> dict[str, Any]:
    peft_dir = root / f"peft-{experts}"
    count, nbytes = write_peft_dir(peft_dir, experts, seed=experts)
    start = time.perf_counter()
    pack = import_peft_dir(peft_dir, base_id=BASE_ID)
    import_s = time.perf_counter() - start
    pack_path = root / f"moe-{experts}.pack"
    pack_path.write_bytes(pack)
    paths = {"pack": pack_path, "peft": peft_dir}
    print(
        f"E={experts}: {count} PEFT tensors, {nbytes / 2**20:.1f} MiB; page cache ...", flush=True
    )
    page_cache = run_page_cache(experts, paths, repeats)
    print(f"E={experts}: catalog over gRPC ...", flush=True)
    grpc = run_grpc(experts, paths, repeats, root, digest)
    print(f"E={experts}: colocated catalog ...", flush=True)
    colocated = run_grpc(experts, paths, repeats, root, digest, colocated=True)
    from catalog.pack import read_pack

    def speedup(setting: dict[str, Any], raw: bool, key: str = "x_packed_time") -> float:
        loaders = setting["loaders"]
        return min(  # type: ignore[no-any-return]
            v[key] for k, v in loaders.items() if "1-by-1" in k and ("raw views" in k) == raw
        )

    return {
        "experts": experts,
        "peft_tensors": count,
        "pack_tensors": len(read_pack(pack).tensor_names()),
        "lora_bytes": nbytes,
        "pack_bytes": len(pack),
        "import_peft_dir_s": import_s,
        "page_cache": page_cache,
        "grpc": grpc,
        "colocated": colocated,
        "speedup_page_cache": speedup(page_cache, raw=False),
        "speedup_grpc": speedup(grpc, raw=False),
        "speedup_colocated": speedup(colocated, raw=False),
        "speedup_page_cache_vs_raw_views": speedup(page_cache, raw=True),
        "speedup_grpc_vs_raw_views": speedup(grpc, raw=True),
        "speedup_colocated_vs_raw_views": speedup(colocated, raw=True),
        "speedup_page_cache_cpu": speedup(page_cache, raw=False, key="x_packed_cpu"),
        "speedup_grpc_cpu": speedup(grpc, raw=False, key="x_packed_cpu"),
        "speedup_colocated_cpu": speedup(colocated, raw=False, key="x_packed_cpu"),
        "transfer_mb_s": len(pack) / grpc["loaders"][TRANSFER[False]]["median_s"] / 1e6,
        "colocated_transfer_mb_s": len(pack)
        / colocated["loaders"][TRANSFER[True]]["median_s"]
        / 1e6,
        # What a packed loader doing nothing after its transfer would score over gRPC: the
        # unpacked loader pays the same transfer, so this bounds the gRPC speedup.
        "grpc_ceiling": min(
            v["median_s"] for k, v in grpc["loaders"].items() if "1-by-1" in k and "raw" not in k
        )
        / grpc["loaders"][TRANSFER[False]]["median_s"],
        "colocated_ceiling": min(
            v["median_s"]
            for k, v in colocated["loaders"].items()
            if "1-by-1" in k and "raw" not in k
        )
        / colocated["loaders"][TRANSFER[True]]["median_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERT_COUNTS))
    parser.add_argument(
        "--digest",
        choices=["sha256", "blake3"],
        default="sha256",
        help="what the catalog identifies (and the client verifies) revisions by",
    )
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    global DEVICE
    DEVICE = args.device

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-moe-attach-") as tmp:
        for experts in args.experts:
            runs.append(run(experts, args.repeats, Path(tmp), args.digest))

    rows = []
    for r in runs:
        for setting in SETTINGS:
            for name, stats in r[setting]["loaders"].items():
                tensors = r["pack_tensors"] if name.startswith("packed") else r["peft_tensors"]
                rows.append(
                    [
                        f"E={r['experts']}",
                        setting,
                        name,
                        tensors if not name.startswith("transfer") else "-",
                        stats["median_s"] * 1e3,
                        stats["cpu_median_s"] * 1e3,
                        r["lora_bytes"] / stats["median_s"] / 1e6,
                        stats["x_packed_time"],
                        stats["x_packed_cpu"],
                    ]
                )
    print_table(
        f"MoE LoRA into resident expert slots ({LAYERS} layers, hidden {HIDDEN}, expert "
        f"intermediate {EXPERT_INTERMEDIATE}, rank {RANK}, bf16, q/v + experts; median of "
        f"{args.repeats})",
        ["experts", "setting", "loader", "tensors", "ms", "cpu ms", "MB/s", "x packed", "x (cpu)"],
        rows,
    )
    print_table(
        "packed attach: its parts (ms); speedup over the fastest safetensors 1-by-1 unpacked "
        "loader (floor: >= 10x at E=64) and over raw views (a lower bound); ceiling: that unpacked "
        "loader over the transfer alone, the most any packed loader could score through that "
        "catalog",
        [
            "experts",
            "setting",
            "fetch",
            "stage",
            "slot copy",
            "speedup",
            "(cpu)",
            "vs raw views",
            "transfer MB/s",
            "ceiling",
        ],
        [
            [
                r["experts"],
                setting,
                r[setting]["packed_components"]["fetch_s"] * 1e3,
                r[setting]["packed_components"]["stage_s"] * 1e3,
                r[setting]["packed_components"]["copy_s"] * 1e3,
                r[f"speedup_{setting}"],
                r[f"speedup_{setting}_cpu"],
                r[f"speedup_{setting}_vs_raw_views"],
                r.get(f"{setting}_transfer_mb_s".replace("grpc_", ""), "-"),
                r.get(f"{setting}_ceiling", "-"),
            ]
            for r in runs
            for setting in SETTINGS
        ],
    )
    floors = {
        f"{setting}_e64_ge_10x": r[f"speedup_{setting}"] >= 10
        for r in runs
        if r["experts"] == 64
        for setting in SETTINGS
    }
    print("\nfloors:", floors)
    name = "moe_attach" if args.digest == "sha256" else f"moe_attach_{args.digest}"
    write_results(
        name if args.device == "cpu" else f"{name}_cuda",
        {
            "device": device_info(args.device),
            "config": {
                "layers": LAYERS,
                "hidden": HIDDEN,
                "expert_intermediate": EXPERT_INTERMEDIATE,
                "rank": RANK,
                "dtype": "bf16",
                "repeats": args.repeats,
                "dense_modules": sorted(DENSE),
                "expert_projections": sorted(EXPERT_PROJECTIONS),
                "torch_threads": 1,
                "digest": args.digest,
            },
            "runs": runs,
            "floors_met": floors,
        },
    )


if __name__ == "__main__":
    main()
