"""The durable tier failing under load: SeaweedFS paused (SIGSTOP/SIGCONT) and killed
(SIGKILL, restart on the same port and data) while clients push and fetch through gRPC.

Question: do clients get UNAVAILABLE or DEADLINE_EXCEEDED within their deadline, is anything
acknowledged lost or anything half-written visible, and how long does the catalog take to
recover by itself? (The scenario and its checks: ``catalog/testing/s3_faults.py``.)

Run: .venv/bin/python bench/bench_s3_faults.py [--total-s 32] [--pushers 3] [--fetchers 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_results
from catalog.testing.s3_faults import FaultPlan, run_faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-s", type=float, default=32.0)
    parser.add_argument("--pushers", type=int, default=3)
    parser.add_argument("--fetchers", type=int, default=3)
    parser.add_argument("--deadline-s", type=float, default=5.0)
    args = parser.parse_args()
    plan = FaultPlan(
        total_s=args.total_s,
        pushers=args.pushers,
        fetchers=args.fetchers,
        deadline_s=args.deadline_s,
    )
    with tempfile.TemporaryDirectory(prefix="loracat-faults-") as work:
        report = run_faults(Path(work), plan)
    doc = report.to_json()
    rows = [
        [kind, doc["operations"][kind], *(counts.get(c, 0) for c in
         ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"))]
        for kind, counts in doc["outcomes"].items()
    ]  # fmt: skip
    print_table(
        f"SIGSTOP {plan.pause_s:.0f} s at {plan.pause_at:.0f} s, SIGKILL at {plan.crash_at:.0f} s "
        f"(down {plan.down_s:.0f} s), client deadline {plan.deadline_s:.0f} s",
        ["operation", "tried", "OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"],
        rows,
    )
    print_table(
        "after the faults",
        ["other errors", "late", "slowest failure s", "lost", "half-written visible",
         "visible unacked", "verify problems", "rebuilt index matches"],
        [[doc["other_errors"], doc["late"], doc["max_failed_call_s"], doc["lost"],
          doc["half_written"], doc["visible_unacknowledged"], len(doc["verify_problems"]),
          doc["rebuilt_index_matches"]]],
    )  # fmt: skip
    print_table(
        "recovery (s from the fault's end to the first OK call)",
        list(doc["recovery_s"]),
        [list(doc["recovery_s"].values())],
    )
    write_results("s3_faults", doc)


if __name__ == "__main__":
    main()
