"""`loracat plan` as a person runs it: the report files, and bad input as one line, never a
traceback. Runs the real console script in a child process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from catalog.plan.workload import parse_trace
from tests.servers import loracat_command

SYNTHETIC = ["--adapters", "100", "--rate", "10", "--duration", "100", "--points", "4"]


def _loracat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*loracat_command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


def test_json_and_html_from_a_synthetic_workload(tmp_path: Path) -> None:
    page = tmp_path / "plan.html"
    result = _loracat(
        "plan",
        *SYNTHETIC,
        "--policies",
        "lru,s3fifo",
        "--slo-p99-ms",
        "50",
        "--html",
        str(page),
        "--json",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["requests"] == 1000 and plan["recommendation"]["met"] is True
    text = page.read_text()
    # The service-mix plot, and one curve plot per tier that requests reach.
    plotted = sum(1 for tier in plan["tiers"].values() if tier["requests"])
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 1 + plotted >= 3
    # Nothing to fetch: no scripts, links, external sources or stylesheets.
    for fetching in ("<script", "<link", 'src="http', "src='http", "url(http", "@import"):
        assert fetching not in text
    assert 'href="http' not in text and "href='http" not in text


def test_a_trace_on_stdin_with_times(tmp_path: Path) -> None:
    lines = "".join(f"acme/a{i % 7}@1 {1000 * (i % 7 + 1)} {i * 0.5:.3f}\n" for i in range(200))
    result = _loracat(
        "plan",
        "--trace",
        "-",
        "--rows-per-batch",
        "4",
        "--request-s",
        "2",
        "--policies",
        "lru",
        "--json",
        "--workers",
        "1",
        stdin=lines,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["adapters"] == 7 and plan["duration_s"] == pytest.approx(99.5)
    # 200 requests over 99.5 s = 2.01/s, x 2 s = 4.02 rows busy, 4 per batch -> 2 engines.
    assert plan["engines"]["engines"] == 2


@pytest.mark.parametrize(
    ("trace", "message"),
    [
        ("acme/a@1 100\nacme/b@1 1x0\n", "line 2: size '1x0' is not a positive integer"),
        ("acme/a@1 100\n\nacme/a@1 200\n", "line 3: acme/a@1 has size 200 but line 1 gave 100"),
        ("# nothing\n\n", "has no requests"),
        ("acme/a@1 100 5\nacme/b@1 100\n", "line 2: no timestamp"),
        ("acme/a@1 100 5\nacme/b@1 100 4\n", "line 2: timestamp 4.0 is earlier"),
        ("acme/a@1 100 5\nAcme/b 100 6\n", "line 2:"),
        ("acme/a@1 100 5 7\n", "line 1: expected 'REF SIZE_BYTES [TIMESTAMP_S]'"),
        ("acme/a@1 100 nan\n", "line 1: timestamp 'nan' is not a number"),
    ],
)
def test_bad_traces_are_one_line_naming_the_line(tmp_path: Path, trace: str, message: str) -> None:
    path = tmp_path / "trace.txt"
    path.write_text(trace)
    _refused(_loracat("plan", "--trace", str(path)), message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--capacities", "gpu=0"], "capacities must be positive, got 0"),
        (["--capacities", "host=-5G"], "is negative"),
        (["--capacities", "nvme=0"], "capacities must be positive, got 0"),
        (["--compare", "0:1G:1G"], "gpu_slots must be a positive integer"),
        (["--compare", "4:1G"], "SLOTS:HOST_BYTES:NVME_BYTES"),
        (["--policies", "fifo"], "unknown eviction policy 'fifo'"),
        (["--min-gpu-hit", "2"], "--min-gpu-hit is a fraction"),
        (["--profile", "/nonexistent/profile.json"], "cannot read tier profile"),
    ],
)
def test_bad_options_are_one_line(args: list[str], message: str) -> None:
    _refused(_loracat("plan", *SYNTHETIC, *args), message)


def test_no_workload_and_two_workloads_are_refused(tmp_path: Path) -> None:
    _refused(_loracat("plan"), "give either --trace FILE or a synthetic workload")
    path = tmp_path / "t.txt"
    path.write_text("acme/a@1 1\n")
    _refused(_loracat("plan", "--trace", str(path), *SYNTHETIC), "give either --trace")
    _refused(_loracat("plan", "--adapters", "10"), "needs --rate and --duration")
    _refused(_loracat("plan", "--trace", str(tmp_path / "missing.txt")), "cannot read trace")


def test_an_unmet_slo_is_a_clear_statement_not_an_error() -> None:
    result = _loracat(
        "plan",
        *SYNTHETIC,
        "--policies",
        "lru",
        "--slo-p99-ms",
        "0.0001",
        "--capacities",
        "gpu=1,2",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "NOT MET: no configuration in the searched range meets p99 <= 0.0001 ms" in (
        result.stdout
    )
    assert "closest" in result.stdout


def test_parse_trace_keeps_keys_in_first_seen_order() -> None:
    workload = parse_trace(["b/x@1 5", "a/y@2 7", "b/x@1 5"])
    assert workload.keys == ["b/x@1", "a/y@2"]
    assert workload.ids.tolist() == [0, 1, 0] and workload.times is None
    assert workload.warmed().ids.tolist() == [1, 0, 0, 1, 0]
