"""The `loracat` CLI as a person runs it: a real subprocess against a real server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from safetensors.torch import load_file

from tests.servers import loracat_command


def run(served, *args, check=True):  # type: ignore[no-untyped-def]
    env = {**os.environ, "LORACAT_SERVER": served.address}
    proc = subprocess.run(
        [*loracat_command(), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"loracat {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def test_push_show_ls_pull_roundtrip(served, adapter_dirs, tmp_path):
    src = adapter_dirs["all-r8"]
    out = run(served, "push", src, "acme/cli", "--base", "tiny-llama-test", "--alias", "serving")
    assert out.stdout.startswith("pushed acme/cli@1 sha256:")

    shown = json.loads(run(served, "show", "acme/cli@serving", "--json").stdout)
    assert shown["name"] == "acme/cli" and shown["revision"] == 1
    assert shown["rank"] == 8 and shown["base_id"] == "tiny-llama-test"
    assert shown["digest"].startswith("sha256:") and shown["size_bytes"] > 0
    assert shown["aliases"] == {"latest": 1, "serving": 1}
    assert shown["created_at"].endswith("Z") and "T" in shown["created_at"]

    listing = json.loads(run(served, "ls", "acme", "--json").stdout)
    assert [a["name"] for a in listing["adapters"]] == ["acme/cli"]
    assert listing["next_page_token"] is None

    run(served, "pull", "acme/cli@1", tmp_path / "peft", "--format", "peft")
    original = load_file(str(src / "adapter_model.safetensors"))
    pulled = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert original.keys() == pulled.keys()
    assert all(
        original[k].equal(pulled[k]) and original[k].dtype == pulled[k].dtype for k in original
    )
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    source_config = json.loads((src / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules"):
        assert config[key] == source_config[key]

    run(served, "pull", "acme/cli", tmp_path / "x.pack", "--format", "pack")
    assert (tmp_path / "x.pack").stat().st_size == shown["size_bytes"]
    # A pack file pushes as well, and is recognised as the same revision.
    again = run(served, "push", tmp_path / "x.pack", "acme/cli")
    assert again.stdout.startswith("unchanged")


def test_alias_and_rollback_commands(served, adapter_dirs):
    for key in ("qv-r4", "down-r2"):
        run(served, "push", adapter_dirs[key], "acme/al", "--base", "b")
    run(served, "alias", "set", "acme/al", "serving", "1")
    run(served, "alias", "set", "acme/al", "serving", "2", "--expect", "1")
    lost = run(served, "alias", "set", "acme/al", "serving", "1", "--expect", "1", check=False)
    assert lost.returncode == 4  # conflict
    assert lost.stderr.strip() == "error: alias acme/al@serving points at revision 2, expected 1"
    out = run(served, "rollback", "acme/al", "serving")
    assert out.stdout.strip() == "acme/al@serving: 2 -> 1"
    history = json.loads(run(served, "alias", "history", "acme/al", "serving", "--json").stdout)
    assert [(m["previous"], m["revision"]) for m in history] == [(None, 1), (1, 2), (2, 1)]


@pytest.mark.parametrize(
    ("args", "message", "status"),
    [
        (("show", "acme/nope"), "error: adapter acme/nope not found", 3),
        (("show", "Acme/x"), "error: invalid reference 'Acme/x'", 2),
        (
            ("push", "/nonexistent/dir", "acme/x"),
            "error: /nonexistent/dir: no such file or directory",
            2,
        ),
        (("rm", "acme/nope@3"), "error: adapter acme/nope not found", 3),
    ],
)
def test_errors_are_one_readable_line(served, args, message, status):
    proc = run(served, *args, check=False)
    assert proc.returncode == status
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_push_of_a_peft_dir_missing_a_file(served, adapter_dirs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["qv-r4"], broken)
    (broken / "adapter_model.safetensors").unlink()
    proc = run(served, "push", broken, "acme/broken", "--base", "b", check=False)
    assert proc.returncode == 2  # invalid input
    assert "adapter_model.safetensors" in proc.stderr
    assert json.loads(run(served, "ls", "--json").stdout)["adapters"] == []


def test_unreachable_server_is_a_clear_error(tmp_path):
    from tests.servers import free_port

    env = {**os.environ, "LORACAT_SERVER": f"127.0.0.1:{free_port()}"}
    proc = subprocess.run(
        [*loracat_command(), "ls"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 6
    assert "unavailable" in proc.stderr


def test_cache_stats_shows_every_tier_with_engine_counters(served, adapter_dirs):
    run(served, "push", adapter_dirs["qv-r4"], "acme/st", "--base", "tiny-llama-test")
    run(served, "pull", "acme/st", "/dev/null", "--format", "pack")
    with served.client() as client:
        digest = str(client.resolve("acme/st").digest)
        client.register_engine("engine-cli", "tiny-llama-test", 4, 16)
        client.report_residency(
            "engine-cli",
            gpu=[digest],
            host=[digest],
            tiers=[{"tier": "gpu", "bytes": 4096, "bytes_in": 4096, "misses": 1}],
        )
    tiers = json.loads(run(served, "cache", "stats", "--json").stdout)["tiers"]
    assert set(tiers) == {"durable", "nvme", "host", "gpu"}
    for counters in tiers.values():
        assert {"bytes", "entries", "hits", "misses", "evictions"} <= set(counters)
    assert tiers["gpu"]["bytes"] == 4096 and tiers["gpu"]["entries"] == 1
    # The push admitted the pack to the NVMe tier, so the pull was a hit.
    assert tiers["nvme"]["hits"] == 1 and tiers["nvme"]["misses"] == 0
    assert tiers["nvme"]["bytes_in"] > 0
    table = run(served, "cache", "stats").stdout
    assert [line.split()[0] for line in table.splitlines() if line.strip()][-4:] == [
        "durable",
        "nvme",
        "host",
        "gpu",
    ]


def test_serve_defaults_match_the_server_defaults():
    # The CLI spells its defaults out (it does not import grpc to start); keep them in step.
    from catalog.cli.main import serve
    from catalog.service.server import DEFAULT_MAX_HINT_WATCHERS, DEFAULT_MAX_WORKERS

    defaults = {p.name: p.default for p in serve.params}
    assert defaults["max_workers"] == DEFAULT_MAX_WORKERS
    assert defaults["max_hint_watchers"] == DEFAULT_MAX_HINT_WATCHERS
