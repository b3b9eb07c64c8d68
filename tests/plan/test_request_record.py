"""The server's request record over real gRPC, and `loracat trace export` writing it as a trace
that `loracat plan` reads."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from catalog.errors import InvalidArgument
from catalog.plan.workload import read_trace
from catalog.service.request_record import RequestRecord
from tests.servers import loracat_command, running_catalog


def test_the_record_rotates_and_filters() -> None:
    record = RequestRecord(3)
    for i in range(5):
        record.add("resolve", f"t/a@{i}", 10 + i, "e1" if i % 2 else "e2")
    assert [e.ref for e in record.since()] == ["t/a@2", "t/a@3", "t/a@4"]
    assert record.dropped == 2 and len(record) == 3
    assert [e.ref for e in record.since(engine="e1")] == ["t/a@3"]
    assert record.since(since=time.time() + 60) == []
    with pytest.raises(InvalidArgument):
        RequestRecord(0)


def test_resolves_and_fetches_are_recorded_and_exported(
    tmp_path: Path, plan_packs: list[bytes]
) -> None:
    with running_catalog(tmp_path / "root") as running, running.client() as client:
        small, large = plan_packs[0], plan_packs[2]
        client.push("acme/small", small, aliases=["serving"])
        client.push("acme/large", large)
        started = time.time()
        for ref in ["acme/small@serving", "acme/large", "acme/small@1"]:
            client.resolve(ref)
        client.fetch("acme/large@1")
        entries = client.export_requests(since=started)
        assert [(e["kind"], e["ref"]) for e in entries] == [
            ("resolve", "acme/small@1"),  # the revision an alias resolved to
            ("resolve", "acme/large@1"),
            ("resolve", "acme/small@1"),
            ("fetch", "acme/large@1"),
        ]
        assert entries[0]["size_bytes"] == len(small) and entries[3]["size_bytes"] == len(large)
        assert all(e["engine"] for e in entries), entries  # the peer, without metadata
        times = [e["time"] for e in entries]
        assert times == sorted(times) and started <= times[0] <= time.time()

        trace = tmp_path / "trace.txt"
        result = subprocess.run(
            [
                *loracat_command(),
                "trace",
                "export",
                "--server",
                running.address,
                "--since",
                str(started),
                "--out",
                str(trace),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        workload = read_trace(trace)
        assert workload.requests == 4 and workload.times is not None
        assert workload.keys == ["acme/small@1", "acme/large@1"]
        fetched = subprocess.run(
            [*loracat_command(), "trace", "export", "--server", running.address, "--kind", "fetch"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert fetched.stdout.splitlines()[1].startswith(f"acme/large@1 {len(large)} ")


def test_calibrate_writes_a_profile_plan_reads(tmp_path: Path, plan_packs: list[bytes]) -> None:
    from catalog.plan.profile import load_profile

    with running_catalog(tmp_path / "root") as running, running.client() as client:
        refs = []
        for index in range(3):
            client.push(f"acme/c{index}", plan_packs[index])
            refs += ["--ref", f"acme/c{index}@1"]
        out = tmp_path / "host.json"
        result = subprocess.run(
            [
                *loracat_command(),
                "plan",
                "calibrate",
                "--server",
                running.address,
                *refs,
                "--repeats",
                "2",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    profile = load_profile(out)
    for step in (profile.durable_read, profile.nvme_read, profile.host_stage, profile.device_load):
        assert step.latency_s >= 0 and step.bytes_per_s > 0
    assert profile.source.startswith("calibrated on")
    bad = tmp_path / "bad.json"
    bad.write_text('{"durable_read": {"latency_s": 0, "bytes_per_s": -1}}')
    with pytest.raises(InvalidArgument, match=r"durable_read\.bytes_per_s must be > 0"):
        load_profile(bad)
