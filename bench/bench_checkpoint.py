"""Rebuilding the index from S3: every log object vs a log checkpoint plus the tail.

Question: how much faster is a rebuild (``reindex``, or a new machine's first start) when the
durable tier holds a checkpoint, and what does writing one cost?

1. Bulk-write the durable log of N revisions into SeaweedFS (``bench_scale``'s writer: the
   events every push would have written, with real small packs).
2. Baseline: the core's full-log replay (``Catalog.replay_into``: list, GET every log object,
   apply) into a fresh LMDB index.
3. Write the first checkpoint (it reads the whole log once).
4. Rebuild from the checkpoint: ``load_log`` (GET the checkpoint, check it, list the log) then
   apply into a fresh LMDB index; the index must hold the same adapters and revisions.
5. Append a tail (one more push to some adapters), rebuild from checkpoint + tail, then write
   the next checkpoint incrementally (previous checkpoint + tail only).

Run: .venv/bin/python bench/bench_checkpoint.py [--revisions 100000] [--tail 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scale import bulk_write, events_with_real_packs, real_packs
from bench.common import print_table, write_results
from catalog.checkpoint import load_log, write_checkpoint
from catalog.core import Catalog
from catalog.events import LOG_PREFIX, Event
from catalog.index.lmdb_index import LmdbIndex
from catalog.model import AdapterName


class LogShape:
    """What the tail writer needs to know of the bulk log: each adapter's last event number and
    revision number, and one push event to copy a real pack reference from."""

    def __init__(self) -> None:
        self.last_seq: dict[AdapterName, int] = {}
        self.last_revision: dict[AdapterName, int] = {}
        self.template: Event | None = None

    def track(self, events: Iterable[Event]) -> Iterator[Event]:
        for event in events:
            self.last_seq[event.adapter] = event.seq
            if event.op == "push":
                self.last_revision[event.adapter] = event.revision
                self.template = self.template or event
            yield event

    def tail(self, count: int) -> list[Event]:
        """One more push to each of ``count`` adapters spread over the whole name range."""
        assert self.template is not None, "the log has no push"
        adapters = sorted(self.last_seq)
        step = max(1, len(adapters) // count)
        return [
            replace(
                self.template,
                adapter=adapter,
                seq=self.last_seq[adapter] + 1,
                revision=self.last_revision[adapter] + 1,
                at=time.time(),
            )
            for adapter in adapters[::step][:count]
        ]


def rebuild(store: Any, path: Path) -> dict[str, Any]:
    """``load_log`` + apply into a fresh LMDB index, timed in its two phases."""
    index = LmdbIndex(path, sync=False)
    t0 = time.perf_counter()
    replay = load_log(store)
    t1 = time.perf_counter()
    applied = index.apply_many(replay)
    t2 = time.perf_counter()
    counts = index.counts()
    index.close()
    return {
        "checkpoint": replay.checkpoint,
        "checkpoint_events": replay.checkpoint_events,
        "tail_events": replay.tail_events,
        "events": applied,
        "load_seconds": t1 - t0,
        "apply_seconds": t2 - t1,
        "seconds": t2 - t0,
        "events_per_s": applied / (t2 - t0),
        "adapters": int(counts["adapters"]),
        "revisions": int(counts["revisions"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=100_000)
    parser.add_argument("--tail", type=int, default=1000, help="events appended after")
    parser.add_argument("--workers", type=int, default=32, help="threads of the bulk writer")
    args = parser.parse_args()

    from catalog.storage import open_store
    from catalog.testing.seaweedfs import SeaweedFS

    root = Path(tempfile.mkdtemp(prefix="loracat-checkpoint-"))
    packs = real_packs()
    results: dict[str, Any] = {"revisions": args.revisions, "store": "SeaweedFS S3 on loopback"}
    rows: list[tuple[Any, ...]] = []
    try:
        with SeaweedFS() as s3:
            s3.create_bucket("checkpoint")
            for name, value in s3.env().items():
                os.environ[name] = value
            store = open_store("s3://checkpoint/catalog")
            shape = LogShape()
            events, seconds = bulk_write(
                store,
                shape.track(events_with_real_packs(args.revisions, packs)),
                packs,
                args.workers,
            )
            results["log_write"] = {"events": events, "seconds": seconds}
            rows.append(("bulk log write", f"{events:,} events", f"{seconds:.0f} s", ""))

            # baseline: GET every log object
            catalog = Catalog(
                store, root / "index", lambda p: LmdbIndex(p, sync=False), spool_dir=root / "spool"
            )
            full_index = LmdbIndex(root / "full", sync=False)
            t0 = time.perf_counter()
            replayed = catalog.replay_into(full_index)
            full_seconds = time.perf_counter() - t0
            full_counts = full_index.counts()
            full_index.close()
            catalog.close()
            results["full_log_replay"] = {
                "events": replayed,
                "seconds": full_seconds,
                "events_per_s": replayed / full_seconds,
                "adapters": int(full_counts["adapters"]),
                "revisions": int(full_counts["revisions"]),
            }
            rows.append(
                (
                    "rebuild from every log object",
                    f"{replayed:,} events",
                    f"{full_seconds:.1f} s",
                    f"{replayed / full_seconds:,.0f} events/s",
                )
            )

            first = write_checkpoint(store)
            results["first_checkpoint"] = first.to_json()
            rows.append(
                (
                    "write first checkpoint (reads all)",
                    f"{first.events:,} events",
                    f"{first.seconds:.1f} s",
                    f"{first.size_bytes / 1e6:.1f} MB ({first.raw_bytes / first.size_bytes:.0f}x)",
                )
            )

            # the parts of load_log: one GET of the checkpoint, a listing of the log
            t0 = time.perf_counter()
            blob = store.get(first.name)
            t1 = time.perf_counter()
            listed = sum(1 for _ in store.list(LOG_PREFIX))
            t2 = time.perf_counter()
            results["parts"] = {
                "get_checkpoint_seconds": t1 - t0,
                "checkpoint_bytes": len(blob or b""),
                "list_log_seconds": t2 - t1,
                "log_keys": listed,
            }
            rows.append(("  of which: GET checkpoint", f"{first.size_bytes / 1e6:.1f} MB",
                         f"{t1 - t0:.2f} s", ""))  # fmt: skip
            rows.append(("  of which: list the log", f"{listed:,} keys", f"{t2 - t1:.2f} s",
                         f"{listed / (t2 - t1):,.0f} keys/s"))  # fmt: skip

            from_checkpoint = rebuild(store, root / "from-checkpoint")
            assert (from_checkpoint["adapters"], from_checkpoint["revisions"]) == (
                full_counts["adapters"],
                full_counts["revisions"],
            ), "the checkpoint rebuilt a different index"
            results["checkpoint_rebuild"] = from_checkpoint
            rows.append(
                (
                    "rebuild from checkpoint",
                    f"{from_checkpoint['events']:,} events",
                    f"{from_checkpoint['seconds']:.1f} s",
                    f"{full_seconds / from_checkpoint['seconds']:.0f}x faster "
                    f"(load {from_checkpoint['load_seconds']:.1f} s + "
                    f"apply {from_checkpoint['apply_seconds']:.1f} s)",
                )
            )

            tail = shape.tail(args.tail)
            tail_written, tail_seconds = bulk_write(store, tail, [], args.workers)
            results["tail_write"] = {"events": tail_written, "seconds": tail_seconds}

            with_tail = rebuild(store, root / "with-tail")
            results["checkpoint_plus_tail_rebuild"] = with_tail
            rows.append(
                (
                    "rebuild from checkpoint + tail",
                    f"{with_tail['checkpoint_events']:,} + {with_tail['tail_events']:,}",
                    f"{with_tail['seconds']:.1f} s",
                    f"{full_seconds / with_tail['seconds']:.0f}x faster "
                    f"(load {with_tail['load_seconds']:.1f} s + "
                    f"apply {with_tail['apply_seconds']:.1f} s)",
                )
            )

            second = write_checkpoint(store)
            results["incremental_checkpoint"] = second.to_json()
            rows.append(
                (
                    "write next checkpoint (tail only)",
                    f"{second.new_events:,} new events",
                    f"{second.seconds:.1f} s",
                    f"{first.seconds / second.seconds:.0f}x faster than the first",
                )
            )
            store.close()
        results["speedup_checkpoint"] = full_seconds / from_checkpoint["seconds"]
        results["speedup_checkpoint_plus_tail"] = full_seconds / with_tail["seconds"]
        print_table(
            f"index rebuild from S3 at {args.revisions:,} revisions",
            ["what", "size", "time", "note"],
            rows,
        )
        write_results("checkpoint", results)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
