"""The plan as a few lines of text for a terminal."""

from __future__ import annotations

from typing import Any


def format_bytes(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_capacity(unit: str, capacity: int) -> str:
    if unit == "slots":
        return f"{capacity} slot" if capacity == 1 else f"{capacity} slots"
    return format_bytes(capacity)


def format_plan(plan: dict[str, Any]) -> str:
    """The recommendation and the configurations side by side."""
    recommendation = plan["recommendation"]
    lines = [
        f"{plan['requests']} requests over {plan['adapters']} adapters "
        f"({format_bytes(plan['catalog_bytes'])}); {plan['engines']['engines']} engine(s): "
        f"{plan['engines']['why']}",
        ("recommended: " if recommendation["met"] else "NOT MET: ") + recommendation["statement"],
        "",
        f"{'configuration':<14} {'slots':>6} {'host':>10} {'nvme':>10} {'gpu hit':>8} "
        f"{'host hit':>8} {'nvme hit':>8} {'p50 ms':>8} {'p99 ms':>8} {'cost':>10}",
    ]
    for c in plan["configurations"]:
        cost = "-" if c["cost"] is None else f"{c['cost']:.4g}"
        lines.append(
            f"{c['label']:<14} {c['gpu_slots']:>6} {format_bytes(c['host_bytes']):>10} "
            f"{format_bytes(c['nvme_bytes']):>10} {c['hit_rate']['gpu']:>8.1%} "
            f"{c['hit_rate']['host']:>8.1%} {c['hit_rate']['nvme']:>8.1%} "
            f"{c['delay_ms']['p50']:>8.3g} {c['delay_ms']['p99']:>8.3g} {cost:>10}"
        )
    return "\n".join(lines)
