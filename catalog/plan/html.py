"""The plan as one self-contained HTML page: inputs restated, plots as inline SVG, tables.

Nothing on the page is fetched: the plots are matplotlib SVG written into the page, the style is
inline, there is no script. matplotlib is imported only here, with the non-interactive Agg
backend, so ``catalog.plan`` stays importable without a display.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from catalog.atomic_files import write_atomically
from catalog.plan.text import format_bytes, format_capacity

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.met { background: #e7f6e7; border: 1px solid #8c8; padding: 0.8em; }
.unmet { background: #fbeaea; border: 1px solid #c88; padding: 0.8em; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
.plot svg { width: 100%; height: auto; }
"""

_PALETTE = {
    "lru": "#1f77b4",
    "s3fifo": "#ff7f0e",
    "wtinylfu": "#2ca02c",
    "gdsf": "#9467bd",
    "lrfu-size": "#8c564b",
    "belady": "#000000",
}


def _escape(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{_escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{_escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    # Keep the <svg> element only: the XML prolog and DOCTYPE do not belong inside HTML.
    return text[text.index("<svg") :]


def _curve_figure(tier: str, doc: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    try:
        by_policy: dict[str, list[dict[str, Any]]] = {}
        for point in doc["curves"]:
            by_policy.setdefault(point["policy"], []).append(point)
        scale = 1.0 if doc["unit"] == "slots" else float(1 << 30)
        for policy, points in by_policy.items():
            x = np.array([p["capacity"] for p in points], dtype=np.float64) / scale
            style = "--" if policy == "belady" else "-"
            color = _PALETTE.get(policy)
            axes[0].plot(
                x, [p["hit_rate"] for p in points], style, marker=".", color=color, label=policy
            )
            axes[1].plot(
                x,
                [p["byte_hit_rate"] for p in points],
                style,
                marker=".",
                color=color,
                label=policy,
            )
        unit = "slots per engine" if doc["unit"] == "slots" else "GiB"
        for ax, title in zip(axes, ("hit rate", "byte hit rate"), strict=True):
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.set_xlabel(f"{tier} capacity ({unit})")
            ax.set_ylabel(title)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8, loc="lower right")
        figure.suptitle(f"{tier} tier: {doc['requests']} requests ({doc['stream']})", fontsize=10)
        return _svg(figure)
    finally:
        plt.close(figure)


def _delay_figure(plan: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(11, 1.2 + 0.45 * len(plan["configurations"])))
    try:
        rows = []
        for c in plan["configurations"]:
            rows.append((c["label"], c["served_from"]))
        labels = [label for label, _ in rows]
        left = np.zeros(len(rows))
        colors = {"gpu": "#2ca02c", "host": "#1f77b4", "nvme": "#ff7f0e", "durable": "#d62728"}
        for tier, color in colors.items():
            shares = np.array([served[tier] for _, served in rows])
            ax.barh(labels, shares, left=left, color=color, label=f"served from {tier}")
            left += shares
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of requests")
        ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
        ax.invert_yaxis()
        return _svg(figure)
    finally:
        plt.close(figure)


def render_html(plan: dict[str, Any]) -> str:
    """The page for ``plan`` (a ``build_plan`` document)."""
    recommendation = plan["recommendation"]
    inputs = plan["inputs"]
    profile = inputs["profile"]
    verdict_class = "met" if recommendation["met"] else "unmet"
    verdict = (
        "Recommended: " if recommendation["met"] else "No configuration meets the targets. "
    ) + recommendation["statement"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>loracat capacity plan</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>loracat capacity plan</h1>",
        f"<p class='{verdict_class}'>{_escape(verdict)}</p>",
        "<h2>Inputs</h2>",
        _table(
            ["input", "value"],
            [
                ("workload", inputs["source"]),
                ("requests measured", plan["requests"]),
                ("adapters", plan["adapters"]),
                ("catalog bytes", format_bytes(plan["catalog_bytes"])),
                ("largest pack", format_bytes(plan["largest_pack_bytes"])),
                ("duration", "-" if plan["duration_s"] is None else f"{plan['duration_s']:.4g} s"),
                ("policies", ", ".join(inputs["policies"])),
                (
                    "SLO: p99 load delay",
                    "-" if inputs["slo_p99_ms"] is None else f"{inputs['slo_p99_ms']:g} ms",
                ),
                (
                    "SLO: GPU hit rate",
                    "-" if inputs["min_gpu_hit"] is None else f"{inputs['min_gpu_hit']:.1%}",
                ),
                (
                    "costs",
                    "-"
                    if inputs["costs"] is None
                    else ", ".join(f"{k} {v:g}" for k, v in inputs["costs"].items()),
                ),
                (
                    "tiers start",
                    "warm (every adapter requested once before the trace)"
                    if inputs["warm_start"]
                    else "empty",
                ),
                ("engines", f"{plan['engines']['engines']}: {plan['engines']['why']}"),
            ],
        ),
        f"<p>Tier profile ({_escape(profile['source'])}): seconds per load "
        "= latency + bytes / rate.</p>",
        _table(
            ["step", "latency", "rate"],
            [
                (
                    step,
                    f"{profile[step]['latency_s'] * 1e3:.3g} ms",
                    f"{profile[step]['bytes_per_s'] / 1e6:.4g} MB/s",
                )
                for step in ("durable_read", "nvme_read", "host_stage", "device_load")
            ],
        ),
        "<h2>Configurations</h2>",
        _table(
            [
                "configuration",
                "GPU slots",
                "host",
                "NVMe",
                "GPU hit",
                "host hit",
                "NVMe hit",
                "from S3",
                "p50 delay",
                "p99 delay",
                "mean delay",
                "cost",
            ],
            [
                (
                    c["label"],
                    c["gpu_slots"],
                    format_bytes(c["host_bytes"]),
                    format_bytes(c["nvme_bytes"]),
                    f"{c['hit_rate']['gpu']:.1%}",
                    f"{c['hit_rate']['host']:.1%}",
                    f"{c['hit_rate']['nvme']:.1%}",
                    f"{c['served_from']['durable']:.2%}",
                    f"{c['delay_ms']['p50']:.3g} ms",
                    f"{c['delay_ms']['p99']:.3g} ms",
                    f"{c['delay_ms']['mean']:.3g} ms",
                    "-" if c["cost"] is None else f"{c['cost']:.4g}",
                )
                for c in plan["configurations"]
            ],
        ),
        f"<figure class='plot'>{_delay_figure(plan)}<figcaption>Where requests are served "
        "from, per configuration.</figcaption></figure>",
    ]
    for tier, doc in plan["tiers"].items():
        parts.append(f"<h2>{_escape(tier.upper())} tier</h2>")
        parts.append(
            f"<p>{doc['requests']} requests reach it: {_escape(doc['stream'])}. Hit rates are "
            "fractions of those requests; Belady is the farthest-next-use reference.</p>"
        )
        if doc["requests"]:
            parts.append(f"<figure class='plot'>{_curve_figure(tier, doc)}</figure>")
        else:
            parts.append(
                "<p><strong>No request reaches this tier</strong> in the recommended "
                "configuration: the tiers above serve them all, so its curves are all zero.</p>"
            )
        policies = list(dict.fromkeys(p["policy"] for p in doc["curves"]))
        by_key = {(p["policy"], p["capacity"]): p for p in doc["curves"]}
        parts.append(
            _table(
                ["capacity", *policies],
                [
                    (
                        format_capacity(doc["unit"], capacity),
                        *(f"{by_key[(policy, capacity)]['hit_rate']:.1%}" for policy in policies),
                    )
                    for capacity in doc["capacities"]
                ],
            )
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(plan: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the page to ``path`` (temporary name, then rename: never half-written), with the
    mode a plain ``open`` gives (a report to share).

    Raises:
        OSError: the file cannot be written (``path`` is left as it was).
    """
    # No fsync (none before either): a page lost to a power cut is made again by rerunning
    # the plan.
    write_atomically(path, render_html(plan), fsync=False)
