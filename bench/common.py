"""Shared pieces of the benchmarks: timing stats, result tables and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Where results go: bench/results, or $LORACAT_BENCH_RESULTS (scripts/gpu_check.sh uses it, so a
#: run on another machine never overwrites the figures kept in the repository).
RESULTS = Path(
    os.environ.get("LORACAT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)


def percentile(samples: Sequence[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(samples_s: Sequence[float]) -> dict[str, float]:
    """Latency summary in microseconds."""
    us = [s * 1e6 for s in samples_s]
    return {
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "mean_us": statistics.fmean(us) if us else float("nan"),
        "n": len(us),
    }


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def write_results(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"benchmark": name, "machine": machine(), **doc}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    print(f"\nresults written to {path}")
    return path


def add_device_argument(parser: Any) -> None:
    """``--device cpu|cuda|cuda:N`` for the engine benchmarks."""
    parser.add_argument(
        "--device", default="cpu", help="where the engine runs: cpu, cuda or cuda:N"
    )


def device_info(device: Any) -> dict[str, Any]:
    """What the timings ran on: the device, its name and the torch/CUDA versions."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def synchronizer(device: Any) -> Any:
    """A function that waits for the device's queued work (a no-op on CPU), so a wall-clock
    interval around a call covers the work it launched."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
