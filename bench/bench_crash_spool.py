"""SIGKILL `loracat serve` again and again during concurrent pushes.

Question: after each kill and restart, is every acknowledged push there bit for bit, does
every visible revision verify, does a rebuilt index match, and does the push spool stay empty
(it leaked one file per interrupted push, and a whole large push, before the sweep at start)?

Run: .venv/bin/python bench/bench_crash_spool.py [--kills 6] [--pushers 4] [--large-mib 64]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_results
from catalog.client import CatalogClient
from catalog.errors import CatalogError
from catalog.pack.synthetic import random_pack
from tests.servers import serve_subprocess

BASE_ID = "crash-base"


def pack(seed: int, size: int = 256) -> bytes:
    return random_pack(
        [("self_attn.q_proj", size, size), ("self_attn.v_proj", size, size)],
        num_layers=4,
        rank=16,
        base_id=BASE_ID,
        seed=seed,
    )


def spool_files(root: Path) -> tuple[int, int]:
    files = list((root / "spool").glob("push-*.pack"))
    return len(files), sum(f.stat().st_size for f in files if f.exists())


def snapshot(client: CatalogClient) -> list[dict[str, object]]:
    return [s.to_json() for s in client.iter_adapters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--pushers", type=int, default=4)
    parser.add_argument("--run-s", type=float, default=3.0, help="load before each kill")
    parser.add_argument("--large-mib", type=int, default=64, help="one large push per round")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loracat-crash-"))
    root = work / "root"
    acknowledged: dict[tuple[str, int], bytes] = {}
    rounds = []
    seeds = iter(range(1, 1 << 30))
    lock = threading.Lock()
    # 2 modules x 4 layers x rank 16 x (in + out) x 4 bytes = 1024 bytes per unit of side
    large_side = (args.large_mib << 20) // 1024
    large = pack(0, large_side)
    try:
        for kill in range(args.kills):
            with serve_subprocess(root) as (proc, address):
                stop = threading.Event()

                def pusher(number: int, stop: threading.Event) -> None:
                    with CatalogClient(address) as client:
                        while not stop.is_set():
                            with lock:
                                seed = next(seeds)
                            data = large if number == 0 else pack(seed)
                            name = f"crash/a{seed % 13}"
                            try:
                                rev = client.push(name, data).revision
                            except CatalogError:
                                return  # the server died under us
                            with lock:
                                acknowledged[(str(rev.adapter), rev.number)] = data

                threads = [
                    threading.Thread(target=pusher, args=(i, stop)) for i in range(args.pushers)
                ]
                for t in threads:
                    t.start()
                time.sleep(args.run_s)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                stop.set()
                for t in threads:
                    t.join(60)
                left = spool_files(root)
            rounds.append({"kill": kill + 1, "spool_left": left, "acked_so_far": len(acknowledged)})
            print(f"kill {kill + 1}: {len(acknowledged)} acknowledged so far, spool left {left}")
        with serve_subprocess(root) as (_, address), CatalogClient(address) as client:
            after_restart = spool_files(root)
            lost = sum(
                1 for (name, n), data in acknowledged.items() if client.fetch(f"{name}@{n}") != data
            )
            unreadable = 0
            visible = 0
            for summary in client.iter_adapters():
                for rev in client.iter_revisions(summary.adapter):
                    visible += 1
                    try:
                        client.fetch(rev)
                    except CatalogError:
                        unreadable += 1
            problems = client.verify()["problems"]
            before = snapshot(client)
        shutil.rmtree(root / "index")
        with serve_subprocess(root) as (_, address), CatalogClient(address) as client:
            rebuilt_equal = snapshot(client) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "kills": args.kills,
        "pushers": args.pushers,
        "large_push_bytes": len(large),
        "acknowledged": len(acknowledged),
        "visible_revisions": visible,
        "lost": lost,
        "unreadable": unreadable,
        "verify_problems": len(problems),
        "rebuilt_index_equal": rebuilt_equal,
        "spool_left_at_kill_max": max(r["spool_left"][0] for r in rounds),
        "spool_left_bytes_at_kill_max": max(r["spool_left"][1] for r in rounds),
        "spool_after_restart": after_restart,
        "rounds": rounds,
    }
    print_table(
        f"{args.kills} SIGKILLs of `loracat serve` under {args.pushers} pushers "
        f"(one pushing {len(large) >> 20} MiB packs)",
        ["acknowledged", "lost", "unreadable", "verify problems", "rebuilt index equal",
         "spool files at a kill (max)", "spool bytes at a kill (max)", "spool after restart"],
        [[len(acknowledged), lost, unreadable, len(problems), rebuilt_equal,
          doc["spool_left_at_kill_max"], doc["spool_left_bytes_at_kill_max"],
          f"{after_restart[0]} files"]],
    )  # fmt: skip
    write_results("crash_spool", doc)


if __name__ == "__main__":
    main()
