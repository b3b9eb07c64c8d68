"""loracat as vLLM's adapter source: first requests, warming, hot swap (real vLLM CPU build).

Questions, each answered side by side in one run against one vLLM server that has both the
loracat resolver and vLLM's own filesystem resolver:

1. Cold first request for a never-seen adapter (rank 16, all seven linears): through loracat
   (one ``ExportPeftDir`` call: the catalog, whose durable tier is S3 on SeaweedFS, resolves the
   reference, checks base and rank, and writes the PEFT files into the node cache; it runs on
   the host with ``--peft-export-root`` over the node cache); the pack is evicted from the
   catalog's NVMe tier first so it comes from S3) vs what users script today (download the
   PEFT directory from the same S3 with boto3, then let vLLM's filesystem resolver load it).
   Adapters alternate between the two paths.
   Floor: ratio <= 1.0. ``--no-server-export``: a catalog that does not write for the engine
   (a remote one), so the plugin fetches the pack and writes the files in vLLM's process.
   ``--fsync``: the node cache fsyncs every directory (``LORACAT_VLLM_CACHE_FSYNC=1``; by default
   it does not, guarded by a boot-id marker). Beside them: never-seen adapters whose pack is in
   the catalog's NVMe tier, and where the cold path's time goes outside vLLM (resolve, fetch,
   PEFT export, ExportPeftDir by digest after a resolve and by reference alone, download) and
   inside it (the plugin's log lines).
2. First request for an adapter warmed by a catalog hint (an alias ``serving`` move, which the
   plugin turns into a load into vLLM's LoRA cache) vs a request for an adapter vLLM has loaded
   and used. Floor: <= 1.1x.
3. Alias move to the first response served by the new revision (the response's ``model`` names
   the revision: ``t/n@serving#N``). First the plugin's part is timed (until the old revision's
   name leaves vLLM's table, polled on ``/v1/models``), then 1-token requests are sent until one
   is served by the new revision. Floor: p99 <= 2 s.

Run (needs .venv-vllm, made by scripts/vllm_venv.sh):
    .venv/bin/python bench/bench_vllm.py [--adapters 12] [--moves 40] [--no-server-export]
        [--fsync]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import percentile, print_table, write_results
from catalog.bases import base_identity
from catalog.client import CatalogClient
from catalog.errors import NotFound
from catalog.pack import export_peft_dir, import_peft_dir
from catalog.peft_export import NONCE_FILE
from catalog.testing.seaweedfs import SeaweedFS
from tests.vllm.harness import (
    ALL_LINEARS,
    CatalogProcess,
    VllmServer,
    build_tiny_base,
    ensure_vllm_venv,
    make_adapter,
)

#: A base large enough that a rank-16 adapter on all seven linears is ~2.4 MB (f32).
BENCH_SHAPE = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)
BUCKET = "bench-vllm"
#: One token: the questions are about the adapter path; longer decodes only add the same
#: per-token time to both sides (and noise on a shared machine).
MAX_TOKENS = 1


def timed_complete(vllm: VllmServer, model: str, max_tokens: int = MAX_TOKENS) -> float:
    started = time.perf_counter()
    status, body = vllm.complete(model, max_tokens=max_tokens)
    elapsed = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"{model}: {status} {body}")
    return elapsed


def upload_peft_dir(s3: Any, directory: Path, prefix: str) -> None:
    for path in sorted(directory.iterdir()):
        if path.is_file():
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


def download_peft_dir(s3: Any, prefix: str, into: Path) -> int:
    """What a user's script does: list the prefix, GET every object into a directory."""
    into.mkdir(parents=True)
    total = 0
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    for item in listing.get("Contents", []):
        data = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        (into / item["Key"].rsplit("/", 1)[1]).write_bytes(data)
        total += len(data)
    return total


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (vLLM's engine core is a child of its API server)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far by every thread of ``pids`` (``/proc/<pid>/task/*/schedstat``, in
    nanoseconds: fine enough to split one request's work among the processes)."""
    total = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(stat.read_text().split()[0])
    return total / 1e9


class CpuMeter:
    """CPU seconds each process group spends between :meth:`start` and :meth:`stop`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.spent: dict[str, dict[str, list[float]]] = {}
        self._at: dict[str, float] = {}

    def start(self) -> None:
        self._at = {name: cpu_seconds(pids) for name, pids in self.groups.items()}

    def stop(self, label: str) -> None:
        into = self.spent.setdefault(label, {})
        for name, pids in self.groups.items():
            into.setdefault(name, []).append(cpu_seconds(pids) - self._at[name])


def evict_from_catalog(client: CatalogClient, ref: str) -> None:
    """Make the catalog read ``ref``'s pack from S3 next time (no-op when not cached)."""
    with contextlib.suppress(NotFound):
        client.evict_pack(ref)


def wait_listed(vllm: VllmServer, name: str, timeout: float = 60.0) -> float:
    started = time.perf_counter()
    while name not in vllm.models():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{name} was never loaded by a hint")
        time.sleep(0.02)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=12, help="adapters per path and question")
    parser.add_argument("--moves", type=int, default=40, help="alias moves timed")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="run the plugin with LORACAT_VLLM_CACHE_FSYNC=1 (directories survive a reboot)",
    )
    parser.add_argument(
        "--no-server-export",
        action="store_true",
        help="start the catalog without --peft-export-root: the plugin fetches and writes",
    )
    args = parser.parse_args()
    variant = "".join(
        suffix
        for flag, suffix in ((args.no_server_export, "_fetch"), (args.fsync, "_fsync"))
        if flag
    )
    ensure_vllm_venv()

    import boto3

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    base, model = build_tiny_base(work / "base", **BENCH_SHAPE)
    weed = SeaweedFS().start()
    weed.create_bucket(BUCKET)
    env = weed.env()
    s3 = boto3.client(
        "s3",
        endpoint_url=weed.endpoint_url,
        aws_access_key_id=weed.access_key,
        aws_secret_access_key=weed.secret_key,
        region_name=weed.region,
    )
    node_cache = work / "node-cache"
    node_cache.mkdir()
    catalog = CatalogProcess(
        work / "catalog",
        store_url=f"s3://{BUCKET}/catalog",
        env=env,
        extra_args=[] if args.no_server_export else ["--peft-export-root", str(node_cache)],
    ).start()
    fs_dir = work / "fs-resolver"
    fs_dir.mkdir()
    n = args.adapters
    print(f"making {5 * n + 2} PEFT adapters (rank {args.rank}, all linears)...", flush=True)

    def adapter(key: str, seed: int) -> Path:
        return make_adapter(
            model,
            work / "peft" / key,
            rank=args.rank,
            targets=ALL_LINEARS,
            seed=seed,
            base_name=str(base),
        )

    with catalog.client() as client:
        cold_lc, cold_fs, warm_lc, hinted, loaded = [], [], [], [], []
        for i in range(n):
            path = adapter(f"cold-lc-{i}", 100 + i)
            client.push(f"bench/cold-{i}", import_peft_dir(path))
            path = adapter(f"nvme-{i}", 600 + i)
            client.push(f"bench/nvme-{i}", import_peft_dir(path))
            path = adapter(f"cold-fs-{i}", 200 + i)
            upload_peft_dir(s3, path, f"peft/fs-{i}")
            path = adapter(f"hint-{i}", 300 + i)
            client.push(f"bench/hint-{i}", import_peft_dir(path))
            path = adapter(f"loaded-{i}", 400 + i)
            client.push(f"bench/loaded-{i}", import_peft_dir(path))
        swap_revisions = [adapter("swap-1", 500), adapter("swap-2", 501)]
        for path in swap_revisions:
            client.push("bench/swap", import_peft_dir(path))
        client.set_alias("bench/swap", "serving", 1)
        adapter_bytes = sum(p.stat().st_size for p in (work / "peft" / "cold-lc-0").iterdir())

        vllm = VllmServer(
            base,
            work / "vllm.log",
            catalog=catalog.address,
            cache_dir=node_cache,
            plugins="loracat,lora_filesystem_resolver",
            max_loras=4,
            max_cpu_loras=2 * n + 4,
            env={
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(fs_dir),
                "LORACAT_VLLM_CACHE_FSYNC": "1" if args.fsync else "0",
            },
        )
        print("starting vLLM...", flush=True)
        vllm.start()
        assert vllm.proc is not None and catalog.proc is not None
        meter = CpuMeter(
            {
                "vLLM": _tree(vllm.proc.pid),
                "catalog": [catalog.proc.pid],
                "S3": _tree(weed._process.pid) if weed._process else [],
                "bench": [os.getpid()],
            }
        )
        try:
            for _ in range(3):  # warm-up: the first requests after start compile and allocate
                timed_complete(vllm, str(base))
            timed_complete(vllm, "bench/swap@serving")

            # 1. cold first requests, alternating paths. "Cold" for loracat: the pack is out of
            # the catalog's NVMe tier too (evicted first, untimed), so it comes from S3. Beside
            # them, never-seen adapters whose pack the catalog's NVMe tier holds (prefetched,
            # untimed): the tiered case loracat is built for.
            for i in range(n):
                evict_from_catalog(client, f"bench/cold-{i}@1")
                list(client.prefetch([f"bench/nvme-{i}@1"]))
                if i % 2:
                    meter.start()
                    cold_lc.append(timed_complete(vllm, f"bench/cold-{i}@1"))
                    meter.stop("loracat")
                meter.start()
                started = time.perf_counter()
                download_peft_dir(s3, f"peft/fs-{i}", fs_dir / f"fs-{i}")
                timed_complete(vllm, f"fs-{i}")
                cold_fs.append(time.perf_counter() - started)
                meter.stop("download")
                if not i % 2:
                    meter.start()
                    cold_lc.append(timed_complete(vllm, f"bench/cold-{i}@1"))
                    meter.stop("loracat")
                warm_lc.append(timed_complete(vllm, f"bench/nvme-{i}@1"))

            # 2. hinted first request vs a loaded adapter's request
            for i in range(n):
                timed_complete(vllm, f"bench/loaded-{i}@1")  # load and use it once
                client.set_alias(f"bench/hint-{i}", "serving", 1)  # the attach hint
                wait_listed(vllm, f"bench/hint-{i}@1")
                # Alternate which goes first, so drift in the machine's load cancels out.
                if i % 2:
                    hinted.append(timed_complete(vllm, f"bench/hint-{i}@1"))
                    loaded.append(timed_complete(vllm, f"bench/loaded-{i}@1"))
                else:
                    loaded.append(timed_complete(vllm, f"bench/loaded-{i}@1"))
                    hinted.append(timed_complete(vllm, f"bench/hint-{i}@1"))

            # 3. alias move -> first response from the new revision
            swaps, applied = [], []
            current = 1
            for _ in range(args.moves):
                target = 2 if current == 1 else 1
                started = time.perf_counter()
                client.set_alias("bench/swap", "serving", target, expected=current)
                # The plugin's part: the old revision's name leaves vLLM's table.
                while f"bench/swap@serving#{current}" in vllm.models():
                    time.sleep(0.002)
                applied.append(time.perf_counter() - started)
                # End to end: the first response served by the new revision.
                while True:
                    status, body = vllm.complete("bench/swap@serving", max_tokens=1)
                    if status == 200 and body["model"].endswith(f"#{target}"):
                        break
                swaps.append(time.perf_counter() - started)
                current = target

            # 4. where a cold first request's time goes, outside vLLM (same packs, same S3)
            parts: dict[str, list[float]] = {
                "resolve": [],
                "fetch_s3_via_catalog": [],
                "export_peft_dir": [],
                "boto3_download": [],
                "ExportPeftDir_from_s3": [],
                "ExportPeftDir_by_ref_from_s3": [],  # the plugin's first request: no Resolve
            }
            for i in range(n):
                evict_from_catalog(client, f"bench/cold-{i}@1")
                t0 = time.perf_counter()
                revision = client.resolve(f"bench/cold-{i}@1")
                t1 = time.perf_counter()
                pinned = f"bench/cold-{i}@{revision.digest}"
                data = client.fetch(pinned)
                t2 = time.perf_counter()
                export_peft_dir(data, work / "breakdown" / f"lc-{i}", fsync=args.fsync)
                t3 = time.perf_counter()
                download_peft_dir(s3, f"peft/fs-{i}", work / "breakdown" / f"fs-{i}")
                t4 = time.perf_counter()
                times = [t1 - t0, t2 - t1, t3 - t2, t4 - t3]
                if not args.no_server_export:
                    evict_from_catalog(client, f"bench/cold-{i}@1")
                    into = node_cache / "tmp" / f"bench-{i}"
                    into.mkdir()
                    nonce = secrets.token_hex(16)
                    (into / NONCE_FILE).write_text(nonce)
                    t5 = time.perf_counter()
                    client.export_peft_dir(pinned, into, nonce=nonce, fsync=args.fsync)
                    times.append(time.perf_counter() - t5)
                    evict_from_catalog(client, f"bench/cold-{i}@1")
                    into = node_cache / "tmp" / f"bench-ref-{i}"
                    into.mkdir()
                    (into / NONCE_FILE).write_text(nonce)
                    t6 = time.perf_counter()
                    client.export_peft_dir(
                        f"bench/cold-{i}@1",
                        into,
                        nonce=nonce,
                        fsync=args.fsync,
                        served_base=base_identity(str(base)),
                        max_rank=args.rank,
                    )
                    times.append(time.perf_counter() - t6)
                for key, value in zip(parts, times, strict=False):
                    parts[key].append(value)
        finally:
            vllm.stop()
            catalog.stop()
            weed.stop()
    # The plugin's own time per cold resolve, as it logs it, and its parts (resolve, and
    # export, or fetch and write).
    in_plugin: list[float] = []
    in_plugin_parts: dict[str, list[float]] = {}
    for m in re.finditer(
        r"loracat resolved bench/cold-\d+@1 .* in ([0-9.]+) ms \(([^)]*)\)", vllm.log_tail(10**8)
    ):
        in_plugin.append(float(m.group(1)) / 1e3)
        for part in m.group(2).split(", "):
            key, value, _ = part.split(" ")
            in_plugin_parts.setdefault(key, []).append(float(value) / 1e3)

    def ms(xs: list[float]) -> float:
        return statistics.median(xs) * 1e3

    def paired(xs: list[float], ys: list[float]) -> float:
        """Median of per-pair ratios: each pair ran back to back, under the same load."""
        return statistics.median(x / y for x, y in zip(xs, ys, strict=True))

    cold_ratio = paired(cold_lc, cold_fs)
    hint_ratio = paired(hinted, loaded)
    swap_p99 = percentile(swaps, 99)
    rows = [
        ["cold first request: loracat (S3 -> catalog -> node disk)", ms(cold_lc), "", ""],
        ["cold first request: boto3 download + filesystem resolver", ms(cold_fs), "", ""],
        ["  ratio loracat / download (median of pairs)", "", f"{cold_ratio:.2f}x", "<= 1.0x"],
        ["  ratio of the medians", "", f"{ms(cold_lc) / ms(cold_fs):.2f}x", ""],
        ["first request, pack in the catalog's NVMe tier", ms(warm_lc), "", ""],
        [
            "  ratio NVMe-tier / download (median of pairs)",
            "",
            f"{paired(warm_lc, cold_fs):.2f}x",
            "",
        ],
        ["first request, hinted adapter", ms(hinted), "", ""],
        ["request, adapter loaded and used", ms(loaded), "", ""],
        ["  ratio hinted / loaded (median of pairs)", "", f"{hint_ratio:.2f}x", "<= 1.1x"],
        ["  ratio of the medians", "", f"{ms(hinted) / ms(loaded):.2f}x", ""],
        ["alias move -> old revision's name dropped by the plugin, p50", ms(applied), "", ""],
        [
            "alias move -> old revision's name dropped by the plugin, p99",
            percentile(applied, 99) * 1e3,
            "",
            "",
        ],
        ["alias move -> new revision served, p50", ms(swaps), "", ""],
        ["alias move -> new revision served, p99", swap_p99 * 1e3, f"{swap_p99:.2f} s", "<= 2 s"],
    ]
    print_table(
        "where a cold first request's time goes" + (f" ({variant[1:]})" if variant else ""),
        ["part", "median ms"],
        [[f"outside vLLM: {key}", ms(values)] for key, values in parts.items() if values]
        + [["the resolver inside vLLM, cold (its log)", ms(in_plugin) if in_plugin else ""]]
        + [[f"  inside vLLM: {key}", ms(values)] for key, values in in_plugin_parts.items()],
    )
    print_table(
        "CPU time per cold first request, by process (median ms)",
        ["path", *meter.groups, "all"],
        [
            [
                label,
                *(ms(spent[name]) for name in meter.groups),
                ms([sum(xs) for xs in zip(*spent.values(), strict=True)]),
            ]
            for label, spent in meter.spent.items()
        ],
    )
    print_table(
        f"vLLM {MAX_TOKENS}-token completions, rank {args.rank} adapters of "
        f"{adapter_bytes / 1e6:.1f} MB, {n} per path",
        ["what", "median ms", "figure", "floor"],
        rows,
    )
    write_results(
        "bench_vllm" + variant,
        {
            "command": "python bench/bench_vllm.py " + " ".join(sys.argv[1:]),
            "rank": args.rank,
            "node_cache_fsync": args.fsync,
            "server_export": not args.no_server_export,
            "adapter_bytes": adapter_bytes,
            "base_shape": BENCH_SHAPE,
            "max_tokens": MAX_TOKENS,
            "cold_loracat_s": cold_lc,
            "cold_download_s": cold_fs,
            "cold_ratio": cold_ratio,
            "cold_ratio_of_medians": ms(cold_lc) / ms(cold_fs),
            "nvme_tier_first_s": warm_lc,
            "nvme_tier_ratio": paired(warm_lc, cold_fs),
            "cold_breakdown_s": parts,
            "cold_resolver_in_vllm_s": in_plugin,
            "cold_resolver_in_vllm_parts_s": in_plugin_parts,
            "cold_cpu_s": meter.spent,
            "hinted_first_s": hinted,
            "loaded_s": loaded,
            "hinted_ratio": hint_ratio,
            "hinted_ratio_of_medians": ms(hinted) / ms(loaded),
            "alias_move_s": swaps,
            "alias_move_p50_s": percentile(swaps, 50),
            "alias_move_p99_s": swap_p99,
            "alias_move_applied_s": applied,
            "alias_move_applied_p99_s": percentile(applied, 99),
            "floors": {"cold_ratio": 1.0, "hinted_ratio": 1.1, "alias_move_p99_s": 2.0},
        },
    )
    print(json.dumps({"cold_ratio": cold_ratio, "hinted_ratio": hint_ratio, "p99_s": swap_p99}))


if __name__ == "__main__":
    main()
