"""A colocated push's inbox write, into a new file against over a warm one (issue 14).

Side by side in one process, alternating which goes first: the client's write of a pack of
``--mib`` MiB (17.6 MB: a rank-16 pack of the 0.5B shape) as ``catalog.client.local_push``
does it, ``posix_fallocate`` then ``pwrite`` in 64 KiB pieces, into

- **new**: a new inbox file (``_write_new``), as without warm files, and
- **warm**: a warm file the catalog's own code made (``catalog.warm_inbox.WarmFiles``:
  fallocate'd and read once, on its thread), claimed by rename (``_claim_warm``) and written
  over (``_write_into``).

Both files are kept, as the store keeps a pushed file, so each run takes new page cache as a
stream of pushes does. Before each run the bench allocates, touches and frees ``--churn-mib``
of anonymous memory (untimed), as the handoff bench's full path does: on a VM that reports
freed memory to its host (``/sys/module/page_reporting``), memory touched for the first time
since it was handed back costs a host fault per page. The free pages of buddy orders 0-4
(fragments below 128 KiB, ``/proc/buddyinfo``) before each write are kept beside it; on the
2-core dev VM they did not predict which new-file writes were slow (see docs/PERFORMANCE.md).

    flock /work/notes/bench.lock .venv/bin/python bench/bench_inbox_write.py [--runs 20]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_results
from catalog.client.local_push import _claim_warm, _write_into, _write_new
from catalog.warm_inbox import WARM_NAME, WarmFiles, WarmPolicy


def small_free_pages() -> int:
    """Free 4 KiB pages in buddy orders 0-4 (blocks below 128 KiB), all zones."""
    pages = 0
    with open("/proc/buddyinfo") as f:
        for line in f:
            counts = [int(c) for c in line.split()[4:9]]
            pages += sum(count << order for order, count in enumerate(counts))
    return pages


def churn(nbytes: int) -> None:
    """Allocate, touch and free ``nbytes`` of anonymous memory."""
    if not nbytes:
        return
    with mmap.mmap(-1, nbytes) as block:
        for offset in range(0, nbytes, mmap.PAGESIZE):
            block[offset] = 1


def wait_for_warm_file(inbox: Path, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while not any(WARM_NAME.fullmatch(p.name) for p in inbox.iterdir()):
        if time.monotonic() > deadline:
            raise RuntimeError("the warm file was not made")
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mib", type=float, default=17_600_000 / 2**20)
    parser.add_argument("--churn-mib", type=int, default=1024)
    args = parser.parse_args()
    size = int(args.mib * 2**20)
    pack = os.urandom(size)
    root = Path(tempfile.mkdtemp(prefix="bench-inbox-write-"))
    inbox = root / "inbox"
    inbox.mkdir(mode=0o700)
    kept = root / "kept"  # written files stay (as the store keeps them), out of the inbox
    kept.mkdir()
    dir_fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    warm = WarmFiles(dir_fd, WarmPolicy(files=1))
    rows = []
    try:
        for run in range(args.runs):
            warm.pushed(size)  # the catalog's refill after a push, on its own thread
            wait_for_warm_file(inbox)
            churn(args.churn_mib << 20)
            row = {"run": run, "first": "new" if run % 2 else "warm"}
            for kind in ("new", "warm") if run % 2 else ("warm", "new"):
                path = inbox / f"push-bench{run:04d}{kind}.pack"
                row[f"{kind}_small_free_pages"] = small_free_pages()
                started = time.perf_counter()
                if kind == "new":
                    _write_new(path, pack)
                else:
                    fd = _claim_warm(inbox, path, size)
                    if fd is None:
                        raise RuntimeError("no warm file to claim")
                    _write_into(fd, pack)
                row[f"{kind}_ms"] = (time.perf_counter() - started) * 1e3
                path.rename(kept / path.name)
            rows.append(row)
    finally:
        warm.close()
        os.close(dir_fd)
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        f"inbox write of {size / 1e6:.1f} MB, each run ({args.churn_mib} MiB churned before)",
        ["run", "first", "new ms", "warm ms", "small free pages (new)", "(warm)"],
        [
            [
                r["run"],
                r["first"],
                r["new_ms"],
                r["warm_ms"],
                r["new_small_free_pages"],
                r["warm_small_free_pages"],
            ]
            for r in rows
        ],
    )
    summary = {
        kind: {
            "median_ms": statistics.median(r[f"{kind}_ms"] for r in rows),
            "min_ms": min(r[f"{kind}_ms"] for r in rows),
            "max_ms": max(r[f"{kind}_ms"] for r in rows),
        }
        for kind in ("new", "warm")
    }
    print_table(
        "medians",
        ["file", "median ms", "min ms", "max ms"],
        [[kind, s["median_ms"], s["min_ms"], s["max_ms"]] for kind, s in summary.items()],
    )
    write_results(
        "inbox_write",
        {
            "config": {"bytes": size, "runs": args.runs, "churn_mib": args.churn_mib},
            "summary": summary,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
