"""Durable-tier throughput: local directory vs S3 (a real SeaweedFS on loopback).

For objects of 1, 16 and 64 MiB it times ``put``, ``put_file`` and ``get`` through our stores,
and, in the same run and on the same objects, fsspec's own ``cat_file`` as the baseline our
read path must beat. It also times ``get_many`` of many small objects (the shape of a reindex
over log events) against fsspec's batched ``cat``. Medians; local reads come from the page
cache. Writes a table to stdout and JSON to ``bench/results/store.json``.

    .venv/bin/python bench/bench_store.py [--sizes 1,16,64] [--reps 5] [--small 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsspec

from catalog.storage import BlobStore, open_store
from catalog.storage.fsspec_store import FsspecStore
from catalog.storage.local import LocalDirStore
from catalog.testing import SeaweedFS

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results" / "store.json"


def median_seconds(contenders: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median time of each contender, run in turn within every repetition so that background
    load (this machine is shared) hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fsspec_view(store: BlobStore) -> tuple[Any, Callable[[str], str]]:
    """fsspec's own file system over the same objects, and key -> fsspec path."""
    if isinstance(store, FsspecStore):
        root = f"{store.bucket}/{store.prefix}/" if store.prefix else f"{store.bucket}/"
        return store.fs, lambda key: root + key
    assert isinstance(store, LocalDirStore)
    return fsspec.filesystem("file"), lambda key: str(store.root / key)


def bench_backend(
    name: str,
    store: BlobStore,
    sizes: list[int],
    reps: int,
    small: int,
    scratch: Path,
    one_stream: BlobStore | None = None,
) -> list[dict[str, Any]]:
    """Time ``store``; ``one_stream`` is the same objects read as a single GET stream."""
    rows: list[dict[str, Any]] = []
    fs, path_of = fsspec_view(store)

    def record(op: str, size: int, count: int, seconds: float) -> None:
        rows.append(
            {
                "backend": name,
                "op": op,
                "object_bytes": size,
                "objects": count,
                "median_s": seconds,
                "mib_per_s": size * count / MiB / seconds,
                "objects_per_s": count / seconds,
            }
        )

    for size_mib in sizes:
        size = size_mib * MiB
        data = os.urandom(size)
        key = f"bench/{size_mib}MiB"
        source = scratch / f"{size_mib}MiB.bin"
        source.write_bytes(data)
        writes = median_seconds(
            {
                "put": lambda: store.put(key, data),  # noqa: B023
                "put_file": lambda: store.put_file(key, source),  # noqa: B023
            },
            reps,
        )
        reads: dict[str, Callable[[], object]] = {
            "get": lambda: store.get(key),  # noqa: B023
            "fsspec cat_file": lambda: fs.cat_file(path_of(key)),  # noqa: B023
        }
        if one_stream is not None:
            reads["get (one stream)"] = lambda: one_stream.get(key)  # noqa: B023
        for read in reads.values():
            assert read() == data
        for op, seconds in {**writes, **median_seconds(reads, reps)}.items():
            record(op, size, 1, seconds)
        store.delete(key)

    if small:
        keys = [f"log/t/a{i % 50}/{i:012d}.json" for i in range(small)]
        event = b'{"op":"push","v":1,' + b'"x":"' + b"e" * 300 + b'"}'
        for key in keys:
            store.put(key, event)
        paths = [path_of(key) for key in keys]
        bulk = median_seconds(
            {
                "get_many": lambda: store.get_many(keys),
                "fsspec cat (batched)": lambda: fs.cat(paths),
            },
            3,
        )
        for op, seconds in bulk.items():
            record(op, len(event), small, seconds)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'backend':8} {'op':22} {'object':>10} {'objects':>8} {'median s':>9} {'MiB/s':>8}"
        f" {'obj/s':>8}"
    )
    for row in rows:
        size = row["object_bytes"]
        label = f"{size // MiB} MiB" if size >= MiB else f"{size} B"
        print(
            f"{row['backend']:8} {row['op']:22} {label:>10} {row['objects']:>8} "
            f"{row['median_s']:>9.4f} {row['mib_per_s']:>8.0f} {row['objects_per_s']:>8.0f}"
        )


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    by = {(r["backend"], r["op"], r["object_bytes"]): r["mib_per_s"] for r in rows}
    out = {}
    for (backend, op, size), speed in by.items():
        if op in ("get", "get (one stream)"):
            base = by.get((backend, "fsspec cat_file", size))
            if base:
                out[f"{backend} {op} / cat_file @ {size // MiB} MiB"] = speed / base
        if op == "get_many":
            base = by.get((backend, "fsspec cat (batched)", size))
            if base:
                out[f"{backend} get_many / fsspec cat"] = speed / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,16,64", help="object sizes in MiB")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--small", type=int, default=1000, help="small objects for get_many")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp, SeaweedFS() as server:
        scratch = Path(tmp)
        server.create_bucket("bench")
        with open_store((scratch / "local").as_uri()) as local:
            rows += bench_backend("file", local, sizes, args.reps, args.small, scratch)
        options = server.store_options()
        with (
            open_store("s3://bench/run", **options) as s3,
            open_store("s3://bench/run", read_concurrency=1, **options) as s3_one_stream,
        ):
            rows += bench_backend(
                "s3", s3, sizes, args.reps, args.small, scratch, one_stream=s3_one_stream
            )

    print_table(rows)
    summary = ratios(rows)
    print()
    for name, value in summary.items():
        print(f"{name:40} {value:5.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "bench": "store",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_avg_1m": os.getloadavg()[0],
                },
                "server": "SeaweedFS weed mini on 127.0.0.1 (GOMEMLIMIT=512MiB)",
                "notes": "medians; local reads are from the page cache; local writes fsync",
                "rows": rows,
                "ratios": summary,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
