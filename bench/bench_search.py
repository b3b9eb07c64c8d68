"""Filtered adapter listings (``ls --base/--tag/--alias``) on the LMDB index at scale.

Question: what does a filtered listing cost, set beside the plain listing it walks, in the same
run and on the same index? The filters have no secondary index (``catalog/index/search.py``): a
filter walks the adapters in key order and reads the ``latest`` revision record of each one when
it looks at base or tags, so its cost should follow the adapters walked, not the ones matched.

Every adapter has one revision; 1 in 3 is on base ``b0``, 1 in 100 has tag ``team=rare`` and
1 in 10 has alias ``serving``. Timed, each over every page (page size 1000): the plain listing,
``alias=serving`` (alias map only), ``base_id=b0`` and ``tags={team: rare}`` (latest record).

Run: .venv/bin/python bench/bench_search.py [--adapters 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_results
from catalog.digest import Digest
from catalog.events import Event
from catalog.index.lmdb_index import LmdbIndex
from catalog.model import AdapterName, Page, every_item

MANIFEST: dict[str, Any] = {
    "format_version": 1,
    "rank": 8,
    "alpha": 16.0,
    "dtype": "BF16",
    "num_layers": 2,
    "num_experts": 0,
    "modules": [{"name": "q_proj"}, {"name": "v_proj"}],
}


def events(count: int) -> Iterator[Event]:
    for number in range(count):
        adapter = AdapterName(f"t{number // 1000:04d}", f"a{number % 1000:04d}")
        digest = Digest("sha256", hashlib.sha256(str(adapter).encode()).hexdigest())
        metadata = {"team": "rare" if number % 100 == 0 else "common"}
        yield Event(
            adapter=adapter,
            seq=1,
            op="push",
            at=1_700_000_000.0 + number,
            revision=1,
            digest=digest,
            size_bytes=1000,
            manifest={**MANIFEST, "base_id": f"b{number % 3}"},
            metadata=metadata,
        )
        if number % 10 == 0:
            yield Event(
                adapter=adapter, seq=2, op="alias", at=1_700_000_000.0, revision=1,
                alias="serving", previous=0,
            )  # fmt: skip


def walk(fetch: Callable[[str], Page[Any]]) -> int:
    return sum(1 for _ in every_item(fetch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        index = LmdbIndex(root / "index", sync=False)
        started = time.perf_counter()
        index.apply_many(events(args.adapters))
        ingest_s = time.perf_counter() - started
        cases: dict[str, Callable[[str], Page[Any]]] = {
            "plain listing": lambda token: index.list_adapters("", 1000, token),
            "alias=serving": lambda token: index.search_adapters("", 1000, token, alias="serving"),
            "base_id=b0": lambda token: index.search_adapters("", 1000, token, base_id="b0"),
            "tag team=rare": lambda token: index.search_adapters(
                "", 1000, token, tags={"team": "rare"}
            ),
        }
        results: dict[str, Any] = {}
        for name, fetch in cases.items():
            samples, found = [], 0
            for _ in range(args.repeats):
                started = time.perf_counter()
                found = walk(fetch)
                samples.append(time.perf_counter() - started)
            results[name] = {
                "found": found,
                "seconds_p50": statistics.median(samples),
                "samples_s": samples,
            }
        index.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    plain = results["plain listing"]["seconds_p50"]
    rows = [
        (
            name,
            r["found"],
            f"{r['seconds_p50']:.3f}",
            f"{r['seconds_p50'] / plain:.2f}x",
            f"{r['seconds_p50'] / args.adapters * 1e6:.1f}",
        )
        for name, r in results.items()
    ]
    print_table(
        f"filtered listings over {args.adapters} adapters (every page, p50 of {args.repeats})",
        ["listing", "found", "seconds", "vs plain", "us/adapter walked"],
        rows,
    )
    write_results(
        "search",
        {
            "adapters": args.adapters,
            "repeats": args.repeats,
            "ingest_s": ingest_s,
            "listings": results,
        },
    )


if __name__ == "__main__":
    main()
