"""`loracat plan` at scale: 10^6 requests over 10^5 adapters.

Questions: how long does the full report take (every policy and Belady at 20 capacities per
tier, the SLO search, the HTML page; the policies replayed compiled, ``catalog.plan.compiled``),
and the LRU curve for all capacities in one pass by stack distances, beside one replay of the
LRU policy object and one compiled LRU replay at a single capacity (the per-capacity
alternative)? How long does compiling the replays take on a machine's first run
(``--cold-compile``: an empty numba cache) and loading them from the cache after? Targets from
issue 13: full report <= 60 s, the LRU pass <= 5 s on this 2-core machine. ``--check-python``
builds the plan once more with the Python policy objects and Belady's Python reference (untimed;
minutes at 10^6 requests) and fails unless the document is the same.

Run: .venv/bin/python bench/bench_plan.py [--requests 1000000] [--adapters 100000]
     [--policies lru,s3fifo,...] [--points 20] [--workers 0] [--cold-compile]
     [--check-python]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import catalog.plan.curves
from bench.common import print_table, write_results
from catalog.cache.policies import LRU, POLICIES, make_policy
from catalog.plan.compiled import BELADY, compile_kernels, replay_ids
from catalog.plan.curves import replay_belady_ids, replay_policy
from catalog.plan.html import write_html
from catalog.plan.planner import PlanRequest, build_plan, default_capacities
from catalog.plan.profile import DEFAULT_PROFILE
from catalog.plan.stack import lru_hits, lru_needs, stack_distances
from catalog.plan.workload import synthetic_workload


def python_replay_ids(
    policy: str,
    ids: npt.NDArray[np.int64],
    charged: npt.NDArray[np.int64],
    carried: npt.NDArray[np.int64],
    capacity: int,
    *,
    start: int = 0,
) -> tuple[int, int, list[int]]:
    """``replay_ids`` done by the Python policy objects and Belady's Python reference."""
    if policy == BELADY:
        hits, hit_bytes = replay_belady_ids(ids, charged, carried, capacity, start=start)
    else:
        hits, hit_bytes = replay_policy(
            [str(key) for key in ids.tolist()],
            charged.tolist(),
            carried.tolist(),
            make_policy(policy, capacity),
            start=start,
        )
    return hits, hit_bytes, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--adapters", type=int, default=100_000)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--slo-p99-ms", type=float, default=300.0)
    parser.add_argument(
        "--cold-compile",
        action="store_true",
        help="compile the replays into an empty numba cache (a machine's first run)",
    )
    parser.add_argument(
        "--check-python",
        action="store_true",
        help="also plan with the Python policy objects and require the same document",
    )
    args = parser.parse_args()
    scratch_cache = None
    if args.cold_compile:
        # Read by numba when it is first imported, which compile_kernels() below does.
        scratch_cache = tempfile.TemporaryDirectory(prefix="bench-plan-numba-")
        os.environ["NUMBA_CACHE_DIR"] = scratch_cache.name
    started = time.perf_counter()
    compile_kernels()
    compiled = time.perf_counter() - started

    rate = 1000.0
    started = time.perf_counter()
    workload = synthetic_workload(
        adapters=args.adapters,
        zipf=0.9,
        rate=rate,
        duration_s=args.requests / rate,
        shift_every_s=args.requests / rate / 4,
        seed=0,
    )
    generated = time.perf_counter() - started
    sizes = workload.sizes
    capacities = default_capacities(workload, 1, args.points)

    # The one-pass LRU curve: stack distances, then every capacity at once (both units).
    started = time.perf_counter()
    distances = stack_distances(workload.ids, sizes)
    lru_hits(lru_needs(distances, sizes, unit="slots"), sizes, np.asarray(capacities["gpu"]))
    byte_hits, _ = lru_hits(
        lru_needs(distances, sizes, unit="bytes"), sizes, np.asarray(capacities["host"])
    )
    one_pass = time.perf_counter() - started

    # One replay of the real LRU object at the middle byte capacity, for comparison.
    middle = capacities["host"][len(capacities["host"]) // 2]
    keys = workload.request_keys()
    size_list = sizes.tolist()
    started = time.perf_counter()
    replayed, _ = replay_policy(keys, size_list, size_list, LRU(middle))
    one_replay = time.perf_counter() - started
    stacked = int(byte_hits[len(capacities["host"]) // 2])
    if replayed != stacked:
        raise SystemExit(f"LRU replay {replayed} hits != stack distances {stacked}")
    started = time.perf_counter()
    compiled_hits, _, _ = replay_ids("lru", workload.ids, sizes, sizes, middle)
    one_compiled = time.perf_counter() - started
    if compiled_hits != stacked:
        raise SystemExit(f"compiled LRU replay {compiled_hits} hits != stack {stacked}")

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    request = PlanRequest(
        policies=policies,
        points=args.points,
        workers=args.workers,
        slo_p99_ms=args.slo_p99_ms,
        min_gpu_hit=0.5,
    )
    started = time.perf_counter()
    plan = build_plan(workload, request, DEFAULT_PROFILE)
    planned = time.perf_counter() - started
    python_check = None
    if args.check_python:
        compiled_replay = catalog.plan.curves.replay_ids
        catalog.plan.curves.replay_ids = python_replay_ids  # type: ignore[assignment]
        try:
            started = time.perf_counter()
            same = build_plan(workload, request, DEFAULT_PROFILE) == plan
            python_check = {"same_document": same, "seconds": time.perf_counter() - started}
        finally:
            catalog.plan.curves.replay_ids = compiled_replay
        print(
            f"plan with the Python policy objects: {python_check['seconds']:.0f} s, "
            f"{'the same document' if same else 'A DIFFERENT DOCUMENT'}"
        )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        page = Path(scratch) / "plan.html"
        write_html(plan, page)
        page_bytes = page.stat().st_size
    rendered = time.perf_counter() - started

    curve_points = sum(len(t["curves"]) for t in plan["tiers"].values())
    cache_state = "cold: empty numba cache" if args.cold_compile else "warm: numba cache"
    rows = [
        ("compile the kernels (replays, stack distances)", compiled, cache_state),
        ("generate the workload", generated, ""),
        (
            "LRU, all capacities, one pass (stack distances)",
            one_pass,
            f"{len(capacities['gpu'])} slot + {len(capacities['host'])} byte capacities",
        ),
        (
            "LRU policy object, one capacity (replay)",
            one_replay,
            f"{one_replay / one_pass:.1f}x the one-pass time for 1 point",
        ),
        (
            "LRU compiled, one capacity (replay)",
            one_compiled,
            f"{one_replay / one_compiled:.0f}x faster than the policy object",
        ),
        (
            "full plan: search + curves",
            planned,
            f"{len(policies)} policies + belady, {curve_points} curve points",
        ),
        ("HTML page (matplotlib SVG)", rendered, f"{page_bytes / 1e6:.1f} MB"),
        ("full report (plan + page)", planned + rendered, "target <= 60 s"),
        (
            "full report with the compile",
            compiled + planned + rendered,
            f"target <= 60 s ({cache_state})",
        ),
    ]
    print_table(
        f"loracat plan: {workload.requests:,} requests over {workload.adapters:,} adapters "
        f"(stream per tier: "
        + ", ".join(f"{t} {d['requests']:,}" for t, d in plan["tiers"].items())
        + ")",
        ["step", "seconds", "note"],
        rows,
    )
    print(f"recommendation: {plan['recommendation']['statement']}")
    # The run (every policy, 10^6 requests) is "plan"; others say how they differ.
    name = "plan" if set(policies) == set(POLICIES) else "plan_" + "_".join(policies)
    if args.requests != 1_000_000:
        name += f"_{args.requests}"
    if args.workers:
        name += f"_workers{args.workers}"
    if args.cold_compile:
        name += "_cold_compile"
    write_results(
        name,
        {
            "requests": workload.requests,
            "adapters": workload.adapters,
            "policies": policies,
            "points": args.points,
            "workers": args.workers,
            "numba_cache": "cold" if args.cold_compile else "warm",
            "tier_requests": {t: d["requests"] for t, d in plan["tiers"].items()},
            "seconds": {
                "compile": compiled,
                "generate": generated,
                "lru_one_pass": one_pass,
                "lru_one_replay": one_replay,
                "lru_one_compiled_replay": one_compiled,
                "plan": planned,
                "html": rendered,
                "full_report": planned + rendered,
                "full_report_with_compile": compiled + planned + rendered,
            },
            "lru_hits_check": {"capacity": middle, "replay": replayed, "stack": stacked},
            "recommendation": plan["recommendation"]["statement"],
            "python_check": python_check,
        },
    )
    if python_check is not None and not python_check["same_document"]:
        raise SystemExit("the compiled replays and the Python policy objects disagree")
    if scratch_cache is not None:
        scratch_cache.cleanup()


if __name__ == "__main__":
    main()
