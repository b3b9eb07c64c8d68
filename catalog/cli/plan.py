"""`loracat plan` (capacity planning reports), `loracat plan calibrate`, `loracat trace export`."""

from __future__ import annotations

from pathlib import Path

import click

from catalog.cli.common import json_option, parse_bytes, server_option
from catalog.cli.output import emit_json
from catalog.errors import InvalidArgument


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@click.group(invoke_without_command=True)
@click.option(
    "--trace",
    "trace_path",
    help="Requests, one a line: REF SIZE_BYTES [TIMESTAMP_S]; '-' reads standard input.",
)
@click.option("--adapters", type=int, help="Synthetic workload: number of adapters.")
@click.option("--zipf", type=float, default=1.0, show_default=True, help="Synthetic: Zipf s.")
@click.option("--rate", type=float, help="Requests per second (synthetic; engine sizing).")
@click.option("--duration", type=float, help="Synthetic: seconds of requests.")
@click.option("--shift-every", type=float, help="Synthetic: reshuffle popularity every S s.")
@click.option("--seed", type=int, default=0, show_default=True, help="Synthetic: random seed.")
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Tier profile from `loracat plan calibrate` (default: documented defaults).",
)
@click.option("--slo-p99-ms", type=float, help="Most load delay the p99 request may see.")
@click.option("--min-gpu-hit", type=float, help="Least GPU slot hit rate (a fraction).")
@click.option("--cost-gpu-slot", type=float, default=0.0, help="Price of one GPU slot.")
@click.option("--cost-host-gib", type=float, default=0.0, help="Price of a GiB of host memory.")
@click.option("--cost-nvme-gib", type=float, default=0.0, help="Price of a GiB of NVMe.")
@click.option("--rows-per-batch", type=int, help="Rows an engine batches (engine count).")
@click.option(
    "--request-s",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds a request holds a batch row (engine count).",
)
@click.option("--engines", type=int, help="Engines, instead of sizing them from --rate.")
@click.option(
    "--capacities",
    multiple=True,
    help="TIER=C1,C2,... (gpu in slots; host, nvme in bytes, K/M/G/T); repeatable.",
)
@click.option("--policies", help="Comma-separated eviction policies (default: all).")
@click.option(
    "--points",
    type=int,
    default=20,
    show_default=True,
    help="Capacities per tier when --capacities does not name them.",
)
@click.option("--compare", multiple=True, help="SLOTS:HOST:NVME to show beside; repeatable.")
@click.option("--cold", is_flag=True, help="Start every tier empty (default: warm).")
@click.option("--workers", type=int, default=0, help="Replay threads (0: one per CPU).")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report page here.",
)
@json_option
@click.pass_context
def plan(
    ctx: click.Context,
    trace_path: str | None,
    adapters: int | None,
    zipf: float,
    rate: float | None,
    duration: float | None,
    shift_every: float | None,
    seed: int,
    profile_path: Path | None,
    slo_p99_ms: float | None,
    min_gpu_hit: float | None,
    cost_gpu_slot: float,
    cost_host_gib: float,
    cost_nvme_gib: float,
    rows_per_batch: int | None,
    request_s: float,
    engines: int | None,
    capacities: tuple[str, ...],
    policies: str | None,
    points: int,
    compare: tuple[str, ...],
    cold: bool,
    workers: int,
    html_path: Path | None,
    as_json: bool,
) -> None:
    """Size GPU slots, host memory and NVMe for a workload: hit-rate curves per tier for every
    eviction policy and Belady, load delays, the smallest configuration meeting the SLOs."""
    if ctx.invoked_subcommand is not None:
        return
    from catalog.cache.policies import POLICIES
    from catalog.plan.planner import (
        Costs,
        PlanRequest,
        build_plan,
        parse_capacities,
        parse_configuration,
    )
    from catalog.plan.profile import load_profile
    from catalog.plan.text import format_plan
    from catalog.plan.workload import read_trace, synthetic_workload

    if (trace_path is None) == (adapters is None):
        raise InvalidArgument("give either --trace FILE or a synthetic workload (--adapters ...)")
    if trace_path is not None:
        workload = read_trace(trace_path)
    else:
        assert adapters is not None
        if rate is None or duration is None:
            raise InvalidArgument("a synthetic workload needs --rate and --duration")
        workload = synthetic_workload(
            adapters=adapters,
            zipf=zipf,
            rate=rate,
            duration_s=duration,
            shift_every_s=shift_every,
            seed=seed,
        )
    request = PlanRequest(
        capacities=parse_capacities(capacities, parse_bytes),
        policies=_split(policies) or list(POLICIES),
        slo_p99_ms=slo_p99_ms,
        min_gpu_hit=min_gpu_hit,
        costs=Costs(cost_gpu_slot, cost_host_gib, cost_nvme_gib),
        rate=rate,
        rows_per_batch=rows_per_batch,
        request_s=request_s,
        engines=engines,
        compare=[parse_configuration(text, parse_bytes) for text in compare],
        points=points,
        workers=workers,
        warm=not cold,
    )
    result = build_plan(workload, request, load_profile(profile_path))
    if html_path is not None:
        from catalog.plan.html import write_html

        write_html(result, html_path)
    if as_json:
        emit_json(result)
    else:
        click.echo(format_plan(result))
        if html_path is not None:
            click.echo(f"report: {html_path}")


@plan.command("calibrate")
@click.option(
    "--ref",
    "refs",
    multiple=True,
    required=True,
    help="Adapters to time (several sizes fit latency and rate); repeatable.",
)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the tier profile (JSON).",
)
@server_option
@json_option
def plan_calibrate(
    refs: tuple[str, ...], repeats: int, out_path: Path, server: str, as_json: bool
) -> None:
    """Measure this host: durable (S3) and NVMe reads through the catalog, host staging and
    the device copy, into a tier profile for `loracat plan --profile`."""
    from catalog.cli.common import connect
    from catalog.plan.calibrate import calibrate, write_profile

    if repeats < 1:
        raise InvalidArgument(f"--repeats must be >= 1, got {repeats}")
    with connect(server) as client:
        profile = calibrate(client, list(refs), repeats=repeats)
    write_profile(profile, out_path)
    if as_json:
        emit_json(profile.to_json())
    else:
        for step, cost in profile.to_json().items():
            if isinstance(cost, dict):
                click.echo(
                    f"{step:<13} {cost['latency_s'] * 1e3:8.3f} ms + "
                    f"{cost['bytes_per_s'] / 1e6:10.1f} MB/s"
                )
        click.echo(f"profile: {out_path}")


@click.group()
def trace() -> None:
    """Request traces for `loracat plan`."""


@trace.command("export")
@click.option(
    "--since",
    type=float,
    default=0.0,
    help="Seconds since the epoch; negative: that many seconds before now.",
)
@click.option("--engine", default="", help="Only this caller's requests.")
@click.option(
    "--kind",
    type=click.Choice(["all", "resolve", "fetch"]),
    default="all",
    show_default=True,
    help="resolve: names asked (engines' first uses); fetch: packs loaded.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the trace here (default: standard output).",
)
@server_option
def trace_export(since: float, engine: str, kind: str, out_path: Path | None, server: str) -> None:
    """Write the catalog's request record as a trace: REF SIZE_BYTES TIMESTAMP_S a line."""
    import time

    from catalog.cli.common import connect
    from catalog.plan.workload import format_trace_line

    if since < 0:
        since = time.time() + since
    with connect(server) as client:
        entries = client.export_requests(since=since, engine=engine)
    chosen = [e for e in entries if kind == "all" or e["kind"] == kind]
    lines = [f"# loracat trace export from {server}: {len(chosen)} {kind} requests"]
    lines += [format_trace_line(e["ref"], e["size_bytes"], e["time"]) for e in chosen]
    text = "\n".join(lines) + "\n"
    if out_path is None:
        click.echo(text, nl=False)
    else:
        from catalog.atomic_files import write_atomically

        # No fsync (none before either): an export lost to a power cut is exported again.
        write_atomically(out_path, text, fsync=False)
        click.echo(f"{len(chosen)} requests -> {out_path}", err=True)
