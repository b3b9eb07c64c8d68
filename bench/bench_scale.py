"""The catalog at 10^6 revisions: ingest, index size, resolve in-process and over gRPC, reindex.

Question: with a million revisions addressable, does the catalog keep resolve near the cost of a
bare gRPC round trip, and how long does rebuilding the index from the durable tier take?

1. Bulk-write the durable log of N revisions (the events every push would have written; packs
   are real small packs shared between revisions) into a local-directory store.
2. Ingest: ``reindex`` replays that log into a fresh LMDB index (the path a recovery takes).
3. Resolve in-process through the catalog core (p50/p99), by alias, number and digest prefix.
4. Over gRPC: a `loracat serve` process on that root; resolve at 1/8/64 concurrent callers
   beside a raw gRPC echo server in the same run (ratio), and list-page latency.
5. Reindex from S3 (SeaweedFS) for M revisions (default 10^5): bulk-write the log, replay it.

Run: .venv/bin/python bench/bench_scale.py [--revisions 1000000] [--s3-revisions 100000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_index import log as synthetic_log
from bench.bench_push_resolve import run_timed, serve_root, start
from bench.common import print_table, summarize, write_results
from bench.echo_server import ECHO_METHOD
from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.client import CatalogClient
from catalog.core import Catalog
from catalog.digest import Digest
from catalog.events import Event, blob_key, log_key
from catalog.index.lmdb_index import LmdbIndex
from catalog.model import every_item
from catalog.pack import read_pack
from catalog.pack.synthetic import random_pack
from catalog.service.server import DEFAULT_MAX_HINT_WATCHERS, DEFAULT_MAX_WORKERS
from catalog.shutdown import ShutdownMarker
from catalog.storage.base import BlobStore
from catalog.storage.local import LocalDirStore
from tests.servers import free_port

SHARED_PACKS = 32


def real_packs() -> list[tuple[Digest, bytes, dict[str, Any]]]:
    out = []
    for seed in range(SHARED_PACKS):
        data = random_pack(
            [("self_attn.q_proj", 64, 64), ("self_attn.v_proj", 64, 32)],
            num_layers=2,
            rank=4,
            base_id="bench-base",
            seed=seed,
        )
        out.append((Digest.of(data), data, read_pack(data).manifest.to_json()))
    return out


def events_with_real_packs(
    revisions: int, packs: list[tuple[Digest, bytes, dict[str, Any]]]
) -> Iterable[Event]:
    for event in synthetic_log(revisions, per_adapter=10, tenants=200):
        if event.op == "push":
            digest, data, manifest = packs[(hash(event.adapter) + event.revision) % len(packs)]
            event = replace(event, digest=digest, size_bytes=len(data), manifest=manifest)
        yield event


def bulk_write(store: BlobStore, events: Iterable[Event], packs, workers: int) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for digest, data, _ in packs:
        store.put(blob_key(digest), data, if_absent=True)
    count = 0

    def put(event: Event) -> None:
        store.put(log_key(event.adapter, event.seq), event.encode(), if_absent=True)

    with ThreadPoolExecutor(workers) as pool:
        batch: list[Event] = []
        for event in events:
            batch.append(event)
            if len(batch) == 4096:
                list(pool.map(put, batch))
                count += len(batch)
                batch = []
        list(pool.map(put, batch))
        count += len(batch)
    return count, time.perf_counter() - t0


RESOLVE_METHOD = "/loracat.v1.Catalog/Resolve"


def build(root: Path, args: argparse.Namespace, results: dict[str, Any], rows: list[Any]) -> None:
    """Steps 1-3: write the durable log under ``root``, ingest it, resolve in-process."""
    packs = real_packs()
    # 1. the durable log
    store = LocalDirStore(root / "store", fsync=False)
    events, seconds = bulk_write(store, events_with_real_packs(args.revisions, packs), packs, 8)
    results["log_write"] = {"events": events, "seconds": seconds, "events_per_s": events / seconds}
    rows.append(
        ("bulk log write (file, no fsync)", f"{events:,} events", f"{events / seconds:,.0f}/s")
    )

    # 2. ingest = reindex from the durable tier
    catalog = Catalog(
        store, root / "index", lambda p: LmdbIndex(p, sync=False), spool_dir=root / "spool"
    )
    adapters, revisions, replayed, seconds = catalog.reindex()
    index_bytes = catalog.index.counts()["bytes_on_disk"]
    results["ingest"] = {
        "events": replayed,
        "seconds": seconds,
        "events_per_s": replayed / seconds,
        "adapters": adapters,
        "revisions": revisions,
        "index_bytes": index_bytes,
        "index_bytes_per_revision": index_bytes / revisions,
    }
    rows.append(
        (
            "reindex from file:// (ingest)",
            f"{replayed:,} events",
            f"{replayed / seconds:,.0f}/s in {seconds:.0f}s",
        )
    )
    rows.append(
        ("index on disk", f"{revisions:,} revisions", f"{index_bytes / revisions:.0f} B/revision")
    )

    # 3. in-process resolve through the core
    refs = sample_refs(catalog, args.resolves, "uniform")
    for ref in refs[:2000]:
        catalog.resolve(ref)
    lat = []
    for ref in refs:
        t0 = time.perf_counter()
        catalog.resolve(ref)
        lat.append(time.perf_counter() - t0)
    results["resolve_in_process"] = summarize(lat)
    rows.append(
        (
            "resolve in-process p50 / p99 (uniform refs)",
            "",
            "{p50_us:.1f} / {p99_us:.1f} us".format(**results["resolve_in_process"]),
        )
    )
    catalog.close()
    ShutdownMarker(root / "index.state").close()  # closed cleanly: serve must not rebuild


#: How the resolved refs spread over the catalog's adapters (see ``sample_refs``).
REF_SPREADS = ("hot", "zipf", "uniform")


def sample_refs(catalog: Catalog, count: int, spread: str, seed: int = 0) -> list[str]:
    """``count`` refs (latest, alias ``serving``, number 5), drawn with ``seed``, over the adapters:

    - ``hot``: uniform over the first 1000 adapters (a working set engines re-resolve);
    - ``zipf``: Zipf s=1.0 over every adapter, in a shuffled popularity order (skewed demand);
    - ``uniform``: uniform over every adapter (the worst case: almost every ref is new).
    """
    rng = random.Random(seed)
    names = [
        str(s.adapter) for s in every_item(lambda token: catalog.list_adapters("", 1000, token))
    ]
    if spread == "hot":
        chosen = [rng.choice(names[:1000]) for _ in range(count)]
    elif spread == "uniform":
        chosen = [rng.choice(names) for _ in range(count)]
    elif spread == "zipf":
        order = names[:]
        random.Random(0).shuffle(order)  # one popularity order, whatever the sample's seed
        weights = [1.0 / (rank + 1) for rank in range(len(order))]
        chosen = rng.choices(order, weights=weights, k=count)
    else:
        raise ValueError(f"unknown ref spread {spread!r}; one of {', '.join(REF_SPREADS)}")
    return [name + rng.choice(["", "@serving", "@5"]) for name in chosen]


def refs_of_built_root(
    root: Path, count: int, spreads: list[str], runs: int
) -> dict[str, list[list[str]]]:
    """Refs to resolve on the build in ``root``, read from its index: per spread, ``runs``
    independent samples (two per concurrency level, raw and typed calls, so no measurement finds
    the answers another one put in the server's resolve cache, beyond what its spread repeats)."""
    index = root / "index"
    if not index.exists():
        raise SystemExit(f"--reuse: {root} holds no index; build it first with --root {root}")
    catalog = Catalog(
        LocalDirStore(root / "store", fsync=False),
        index,
        lambda p: LmdbIndex(p, sync=False),
        spool_dir=root / "spool",
    )
    try:
        return {
            spread: [sample_refs(catalog, count, spread, seed) for seed in range(runs)]
            for spread in spreads
        }
    finally:
        catalog.close()
        ShutdownMarker(root / "index.state").close()


def _shifted(call: Callable[[int], object], offset: int, i: int) -> None:
    call(offset + i)


def alternating(
    calls: dict[str, Callable[[int], object]], count: int, concurrency: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Each call ``count`` times at ``concurrency``, in ``rounds`` interleaved slices so a load
    drift on the shared machine hits every call alike; latency summary plus ops/s per call."""
    slice_len = count // rounds
    seconds = dict.fromkeys(calls, 0.0)
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        run_timed(call, min(2000, count), concurrency)  # warm-up
    for r in range(rounds):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in order:
            took, lat = run_timed(
                partial(_shifted, calls[name], r * slice_len), slice_len, concurrency
            )
            seconds[name] += took
            latencies[name] += lat
    return {
        name: {**summarize(latencies[name]), "ops_per_s": rounds * slice_len / seconds[name]}
        for name in calls
    }


def over_grpc(
    root: Path, spreads: dict[str, list[list[str]]], args: argparse.Namespace
) -> tuple[dict[str, Any], list[Any]]:
    """Step 4: resolve through a `loracat serve` process on ``root`` beside the echo server.

    Resolve and echo are called the same way: a raw multicallable sending prebuilt request bytes
    and taking the response bytes undecoded (``resolve`` vs ``echo``; the echo request is a
    serialized ``Revision``, so both directions carry at least the resolve's bytes). The typed
    client (``CatalogClient.resolve``: request built, response decoded into a ``Revision``) is
    measured beside them as ``typed``. One server process serves every spread in turn, the
    hot spread first; the server caches resolve answers (``catalog.service.resolve_cache``), so
    each spread's first round warms what that spread repeats.
    """
    results: dict[str, Any] = {}
    rows: list[Any] = []
    port, echo_port = free_port(), free_port()
    workers, watchers = args.pool
    server = serve_root(
        root,
        port,
        "--cache-bytes",
        "0",
        "--max-workers",
        str(workers),
        "--max-hint-watchers",
        str(watchers),
    )
    echo = start(
        [
            sys.executable,
            str(Path(__file__).with_name("echo_server.py")),
            str(echo_port),
            "--workers",
            str(workers),
            "--watchers",
            str(watchers),
        ],
        "ready",
    )
    try:
        client = CatalogClient(f"127.0.0.1:{port}")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        resolve_call = channel.unary_unary(RESOLVE_METHOD, _registered_method=True)
        echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}")
        echo_call = echo_channel.unary_unary(ECHO_METHOD, _registered_method=True)
        results["grpc"] = {}
        for spread, samples in spreads.items():
            results["grpc"][spread] = {}
            # Raw and typed calls get their own samples: the typed client must not find the
            # answers the raw calls of the same round just cached.
            pairs = zip(args.concurrency, samples[0::2], samples[1::2], strict=True)
            for conc, refs, typed_refs in pairs:
                requests = [pb.ResolveRequest(ref=ref).SerializeToString() for ref in refs]
                payload = resolve_call(requests[0], timeout=10)
                calls: dict[str, Callable[[int], object]] = {
                    "resolve": lambda i, r=requests: resolve_call(r[i], timeout=10),  # type: ignore[misc]
                    "echo": lambda i, p=payload: echo_call(p, timeout=10),  # type: ignore[misc]
                    "typed": lambda i, r=typed_refs: client.resolve(r[i]),  # type: ignore[misc]
                }
                res = alternating(calls, len(refs), conc, args.rounds)
                ratio = res["resolve"]["ops_per_s"] / res["echo"]["ops_per_s"]
                typed_ratio = res["typed"]["ops_per_s"] / res["echo"]["ops_per_s"]
                results["grpc"][spread][str(conc)] = {
                    "distinct_refs": len(set(refs)),
                    **res,
                    "ratio": ratio,
                    "typed_ratio": typed_ratio,
                }
                rows.append(
                    (
                        f"gRPC resolve, {spread} refs, {conc} callers",
                        f"echo {res['echo']['ops_per_s']:,.0f}/s",
                        f"{res['resolve']['ops_per_s']:,.0f}/s = {ratio:.2f}x echo, "
                        f"p99 {res['resolve']['p99_us']:,.0f} us; typed client {typed_ratio:.2f}x",
                    )
                )
        lat = []
        token = ""
        for _ in range(50):
            t0 = time.perf_counter()
            page = client.list_adapters("", page_size=100, page_token=token)
            lat.append(time.perf_counter() - t0)
            token = page.next_token
        results["grpc_list_page_100"] = summarize(lat)
        rows.append(
            ("gRPC list page of 100 p50", "", f"{results['grpc_list_page_100']['p50_us']:,.0f} us")
        )
        client.close()
        channel.close()
        echo_channel.close()
    finally:
        for proc in (server, echo):
            proc.terminate()
            proc.wait(timeout=60)
    return results, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=1_000_000)
    parser.add_argument("--s3-revisions", type=int, default=100_000)
    parser.add_argument("--resolves", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--rounds", type=int, default=4, help="interleaved resolve/echo slices per concurrency"
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="build here and keep it (default: a temp dir)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="--root already holds a build: run only the gRPC part (results: scale_grpc.json)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        nargs=2,
        metavar=("WORKERS", "WATCHERS"),
        default=[DEFAULT_MAX_WORKERS, DEFAULT_MAX_HINT_WATCHERS],
        help="the catalog's thread pool (serve's --max-workers, --max-hint-watchers); resolves "
        "run on its event loop, as the echo's handler does",
    )
    parser.add_argument(
        "--refs",
        nargs="+",
        choices=REF_SPREADS,
        default=list(REF_SPREADS),
        help="how resolved refs spread over the adapters (each measured in turn)",
    )
    args = parser.parse_args()
    if args.reuse and args.root is None:
        parser.error("--reuse needs --root")
    root = args.root or Path(tempfile.mkdtemp(prefix="loracat-scale-"))
    results: dict[str, Any] = {
        "revisions": args.revisions,
        "rounds": args.rounds,
        "pool": {"workers": args.pool[0], "hint_watchers": args.pool[1]},
    }
    rows: list[tuple[Any, ...]] = []
    try:
        if not args.reuse:
            build(root, args, results, rows)
        refs = refs_of_built_root(root, args.resolves, args.refs, 2 * len(args.concurrency))

        # 4. over gRPC, beside echo
        grpc_results, grpc_rows = over_grpc(root, refs, args)
        results.update(grpc_results)
        rows += grpc_rows

        # 5. reindex from S3
        if args.s3_revisions and not args.reuse:
            reindex_from_s3(root, args.s3_revisions, results, rows)
        print_table(f"catalog at {args.revisions:,} revisions", ["what", "size", "result"], rows)
        write_results("scale_grpc" if args.reuse else "scale", results)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


def reindex_from_s3(root: Path, revisions: int, results: dict[str, Any], rows: list[Any]) -> None:
    from catalog.storage import open_store
    from catalog.testing.seaweedfs import SeaweedFS

    packs = real_packs()
    with SeaweedFS() as s3:
        s3.create_bucket("scale")
        for name, value in s3.env().items():
            os.environ[name] = value
        s3_store = open_store("s3://scale/catalog")
        events, seconds = bulk_write(s3_store, events_with_real_packs(revisions, packs), packs, 32)
        rows.append(("bulk log write (S3)", f"{events:,} events", f"{events / seconds:,.0f}/s"))
        s3_catalog = Catalog(
            s3_store,
            root / "s3-index",
            lambda p: LmdbIndex(p, sync=False),
            spool_dir=root / "spool",
        )
        _, count, replayed, seconds = s3_catalog.reindex()
        s3_catalog.close()
        results["reindex_s3"] = {
            "revisions": count,
            "events": replayed,
            "seconds": seconds,
            "events_per_s": replayed / seconds,
        }
        rows.append(
            (
                "reindex from S3",
                f"{count:,} revisions",
                f"{seconds:.0f}s ({replayed / seconds:,.0f} events/s)",
            )
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
