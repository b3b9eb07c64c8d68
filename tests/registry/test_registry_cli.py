"""The registry as a person and a script use it: the `loracat` command, as a subprocess, against
a real catalog over gRPC, with real PEFT adapters. Exit statuses are part of what is tested."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from catalog.cli.main import cli
from tests.servers import free_port, loracat_command, serve_subprocess


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run(address, *args, check=True, env=None):  # type: ignore[no-untyped-def]
    """`loracat ARGS` in this process (click's runner: the same code as the console script,
    without a Python start per call); the exit status is what the script would return."""
    result = CliRunner().invoke(
        cli,
        [str(a) for a in args],
        env={"LORACAT_SERVER": address, **(env or {})},
        prog_name="loracat",
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    ran = Ran(result.exit_code, result.stdout, result.stderr)
    if check and ran.returncode != 0:
        raise AssertionError(f"loracat {args} failed ({ran.returncode}): {ran.stderr}")
    return ran


def run_process(address, *args, check=True, env=None):  # type: ignore[no-untyped-def]
    """`loracat ARGS` as a child process, for what only a real process shows (start-up, pipes)."""
    proc = subprocess.run(
        [*loracat_command(), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "LORACAT_SERVER": address, **(env or {})},
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"loracat {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def js(address, *args):  # type: ignore[no-untyped-def]
    return json.loads(run(address, *args, "--json").stdout)


def one_line_error(proc, status, text):  # type: ignore[no-untyped-def]
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], proc.stderr
    assert proc.stdout == ""


def test_destructive_commands_are_guarded(served, adapter_dirs, tmp_path):
    a = served.address
    run(a, "push", adapter_dirs["qv-r4"], "acme/d", "--base", "b", "--alias", "serving")
    run(a, "push", adapter_dirs["all-r8"], "acme/d", "--base", "b")
    one_line_error(run(a, "rm", "acme/d", "--all", check=False), 5, "serving->1")
    one_line_error(run(a, "rm", "acme/d@1", check=False), 5, "serving")
    one_line_error(run(a, "rm", "acme/d@2", "--force", check=False), 2, "--force goes with --all")
    assert js(a, "ls", "--revisions", "acme/d")["revisions"][0]["revision"] == 1

    # pull: a non-empty folder is refused, --force replaces it whole (no stale files left)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    one_line_error(run(a, "pull", "acme/d@1", out, check=False), 5, "not empty")
    assert (out / "stale.txt").read_text() == "old"
    run(a, "pull", "acme/d@1", out, "--force")
    # peft's save_pretrained wrote a README.md model card: it comes back too
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    run(a, "pull", "acme/d@1", empty)
    pack = tmp_path / "x.pack"
    run(a, "pull", "acme/d@1", pack, "--format", "pack")
    one_line_error(run(a, "pull", "acme/d@2", pack, "--format", "pack", check=False), 5, "exists")
    run(a, "pull", "acme/d@1", "/dev/null", "--format", "pack")
    assert Path("/dev/null").is_char_device()
    cached = js(a, "cache", "ls")
    assert cached and all(e["inserted_at"].endswith("Z") for e in cached)

    run(a, "rm", "acme/d@2")
    dry = js(a, "gc", "--dry-run")
    assert dry["dry_run"] is True and len(dry["deleted"]) == 1 and dry["freed_bytes"] > 0
    text = run(a, "gc", "--dry-run").stdout
    assert text.startswith("would delete 1 blob(s)") and dry["deleted"][0] in text
    assert js(a, "gc")["deleted"] == dry["deleted"]
    assert js(a, "gc", "--dry-run")["deleted"] == []

    run(a, "rm", "acme/d", "--all", "--force")
    one_line_error(run(a, "show", "acme/d@serving", check=False), 3, "not found")


def test_model_card_and_base_through_push_and_pull(served, adapter_dirs, tmp_path):
    a = served.address
    src = tmp_path / "with-card"
    shutil.copytree(adapter_dirs["qv-r4"], src)
    card = "# support adapter\n\nTrained on tickets. \u00e9\n"
    (src / "README.md").write_text(card, encoding="utf-8")
    shown = js(a, "push", src, "acme/card", "--base", "b", "--description", "tickets v1")
    assert shown["metadata"]["model_card"] == card
    assert shown["metadata"]["description"] == "tickets v1"
    assert "model_card" in run(a, "show", "acme/card").stdout
    run(a, "pull", "acme/card", tmp_path / "back")
    assert (tmp_path / "back" / "README.md").read_text(encoding="utf-8") == card

    # the adapter names its base: --base may repeat it, never replace it
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/base-a"
    (src / "adapter_config.json").write_text(json.dumps(config))
    one_line_error(
        run(a, "push", src, "acme/card", "--base", "org/base-b", check=False), 2, "org/base-a"
    )
    assert js(a, "push", src, "acme/card", "--base", "org/base-a")["base_id"] == "org/base-a"
    assert js(a, "push", src, "acme/card2")["base_id"] == "org/base-a"
    pack = tmp_path / "a.pack"
    run(a, "pull", "acme/card2", pack, "--format", "pack")
    one_line_error(run(a, "push", pack, "acme/card3", "--base", "other", check=False), 2, "other")


def test_metadata_provenance_and_search(served, adapter_dirs):
    a = served.address
    run(a, "push", adapter_dirs["qv-r4"], "acme/p", "--base", "b1", "--meta", "team=nlp")
    run(
        a,
        "push",
        adapter_dirs["all-r8"],
        "acme/q",
        "--base",
        "b2",
        "--run-id",
        "run-7",
        "--parent",
        "acme/p@1",
        "--data-digest",
        "sha256:" + "ab" * 32,
        "--eval",
        "acc=0.91",
        "--alias",
        "serving",
    )
    run(a, "push", adapter_dirs["down-r2"], "other/r", "--base", "b1", "--meta", "team=nlp")
    q = js(a, "show", "acme/q")
    assert q["metadata"]["provenance.run_id"] == "run-7"
    assert q["metadata"]["provenance.parent"] == "acme/p@1"
    assert q["metadata"]["provenance.principal"] == "anonymous"
    assert q["metadata"]["provenance.host"] == socket.gethostname()
    assert q["metadata"]["eval.acc"] == "0.91"
    shown_lines = [line.split() for line in run(a, "show", "acme/q").stdout.splitlines()]
    assert ["meta.provenance.run_id", "run-7"] in shown_lines

    def names(*filters: str) -> list[str]:
        return [x["name"] for x in js(a, "ls", *filters)["adapters"]]

    assert names("--base", "b1") == ["acme/p", "other/r"]
    assert names("--tag", "team=nlp", "--base", "b1") == ["acme/p", "other/r"]
    assert names("acme", "--tag", "team=nlp") == ["acme/p"]
    assert names("--alias", "serving") == ["acme/q"]
    assert names("--tag", "provenance.run_id=run-7") == ["acme/q"]
    first = js(a, "ls", "--limit", "1")
    assert [x["name"] for x in first["adapters"]] == ["acme/p"] and first["next_page_token"]
    rest = js(a, "ls", "--page-token", first["next_page_token"])
    assert [x["name"] for x in rest["adapters"]] == ["acme/q", "other/r"]
    assert rest["next_page_token"] is None
    assert "more: --page-token" in run(a, "ls", "--limit", "1").stderr
    one_line_error(run(a, "ls", "--tag", "novalue", check=False), 2, "--tag takes KEY=VALUE")
    one_line_error(run(a, "ls", "--page-token", "garbage", check=False), 2, "page_token")

    meta = js(a, "meta", "set", "acme/p", "description=first", "stage=dev")
    assert meta["metadata"]["description"] == "first" and meta["metadata"]["stage"] == "dev"
    assert "stage" not in js(a, "meta", "rm", "acme/p", "stage")["metadata"]
    one_line_error(
        run(a, "meta", "set", "acme/p", "provenance.run_id=x", check=False), 2, "reserved"
    )
    one_line_error(run(a, "meta", "set", "acme/p", "oops", check=False), 2, "KEY=VALUE")
    one_line_error(run(a, "meta", "set", "acme/nope", "a=b", check=False), 3, "not found")

    # provenance is in the durable log: a rebuilt index still has it
    run(a, "reindex")
    assert js(a, "show", "acme/q")["metadata"] == q["metadata"]
    one_line_error(
        run(
            a,
            "push",
            adapter_dirs["qv-r4"],
            "acme/z",
            "--base",
            "b",
            "--parent",
            "acme/none",
            check=False,
        ),
        3,
        "not found",
    )


def test_alias_moves_and_rollback_walk_back(served, adapter_dirs):
    a = served.address
    for key in ("qv-r4", "all-r8", "down-r2"):
        run(a, "push", adapter_dirs[key], "acme/w", "--base", "b")
    digest2 = js(a, "show", "acme/w@2")["digest"]
    assert js(a, "alias", "set", "acme/w", "serving", "1")["revision"] == 1
    assert js(a, "alias", "set", "acme/w", "serving", digest2[:19])["revision"] == 2
    assert js(a, "alias", "set", "acme/w", "serving", "latest")["revision"] == 3
    run(a, "alias", "set", "acme/w", "canary", "serving")
    assert js(a, "show", "acme/w@canary")["revision"] == 3
    assert run(a, "rollback", "acme/w", "serving").stdout.strip() == "acme/w@serving: 3 -> 2"
    assert run(a, "rollback", "acme/w", "serving").stdout.strip() == "acme/w@serving: 2 -> 1"
    one_line_error(run(a, "rollback", "acme/w", "serving", check=False), 5, "no earlier")
    assert js(a, "rollback", "acme/w", "serving", "--to", "3")["revision"] == 3
    one_line_error(
        run(a, "rollback", "acme/w", "serving", "--expect", "2", check=False), 4, "points at"
    )
    one_line_error(run(a, "alias", "set", "acme/w", "serving", "9", check=False), 3, "9")
    removed = js(a, "alias", "rm", "acme/w", "canary")
    assert removed["revision"] is None and removed["previous"] == 3
    history = js(a, "alias", "history", "acme/w", "serving")
    assert history[0]["previous"] is None and history[0]["at"].endswith("Z")


def test_scriptable_connection_options(served, adapter_dirs):
    port = served.address.rpartition(":")[2]
    run(served.address, "push", adapter_dirs["qv-r4"], "acme/s", "--base", "b")
    for form in (f"127.0.0.1:{port}", f"grpc://127.0.0.1:{port}", f"grpc://localhost:{port}/"):
        assert js(form, "show", "acme/s")["revision"] == 1
    one_line_error(run("http://x:1", "ls", check=False), 2, "unknown scheme")
    one_line_error(run("127.0.0.1:99999", "ls", check=False), 2, "port")
    # a host without a port means the catalog's port 7070, not gRPC's 443
    refused = run_process("127.0.0.1", "ls", "--timeout", "2", check=False)
    assert refused.returncode == 6 and "127.0.0.1:7070" in refused.stderr

    # a port that accepts TCP but never speaks gRPC: --timeout bounds the wait, exit 6
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    started = time.monotonic()
    hung = run_process(
        f"127.0.0.1:{silent.getsockname()[1]}", "ls", "--timeout", "1.5", check=False
    )
    took = time.monotonic() - started
    silent.close()
    for conn in accepted:
        conn.close()
    assert hung.returncode == 6, hung.stderr
    assert len(hung.stderr.strip().splitlines()) == 1
    assert took < 15  # the process start dominates; without --timeout this took ~20 s

    # a reader that goes away: quiet, status 141, nothing on stderr
    for number in range(40):
        run(served.address, "meta", "set", "acme/s", f"k{number}=v")
    reader = subprocess.Popen(
        [*loracat_command(), "show", "acme/s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LORACAT_SERVER": served.address},
    )
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(10)
    reader.stdout.close()
    assert reader.wait(timeout=60) in (0, 141)
    assert reader.stderr.read() == b""


def test_serve_errors_are_one_line_and_options_come_from_the_environment(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        proc = subprocess.run(
            [*loracat_command(), "serve", "--root", tmp_path / "r1"],
            capture_output=True,
            text=True,
            env={**os.environ, "LORACAT_PORT": str(port)},
            timeout=60,
        )
    finally:
        busy.close()
    assert proc.returncode == 6
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (--port): it is in use"
    ]
    bad = subprocess.run(
        [*loracat_command(), "serve", "--root", tmp_path / "r2"],
        capture_output=True,
        text=True,
        env={**os.environ, "LORACAT_CACHE_BYTES": "lots"},
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: not a byte size")


def test_metrics_health_and_access_log(tmp_path, adapter_dirs):
    metrics_port = free_port()
    env = {"LORACAT_METRICS_PORT": str(metrics_port), "LORACAT_ACCESS_LOG": "1"}
    root = tmp_path / "root"
    root.mkdir()
    with serve_subprocess(root, env=env) as (_proc, address):
        run(address, "push", adapter_dirs["qv-r4"], "acme/m", "--base", "b")
        run(address, "show", "acme/nope", check=False)
        base = f"http://127.0.0.1:{metrics_port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"status": "ok", "problems": []}
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/nothing", timeout=10)
        assert missing.value.code == 404
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            body = response.read().decode()
        assert 'loracat_rpc_seconds_count{code="NOT_FOUND",method="Resolve"} 1.0' in body
        # on the catalog's host the CLI's push names a file in its inbox (catalog.local_push)
        assert 'loracat_rpc_seconds_count{code="OK",method="PushFromInbox"} 1.0' in body
        assert "# TYPE loracat_state gauge" in body
        assert 'loracat_state{name="hint_subscribers"}' in body
        assert "# TYPE loracat_events_total counter" in body
        assert 'loracat_events_total{event="hint_subscribers"}' not in body
        # the index becomes unreadable: /healthz says so with 503
        shutil.rmtree(root / "store")
        (root / "store").write_text("not a directory")
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"{base}/healthz", timeout=10)
        assert unhealthy.value.code == 503
        assert "durable store" in json.loads(unhealthy.value.read())["problems"][0]
    log = next(tmp_path.glob("serve-*.log")).read_text()
    access = [line for line in log.splitlines() if "loracat.access" in line]
    assert any(" Resolve NOT_FOUND " in line for line in access), log[-2000:]
    assert any(" PushFromInbox OK " in line for line in access)  # the inbox, on this host


def test_every_serve_option_has_an_environment_variable():
    import click

    from catalog.cli.serve import serve

    options = [p for p in serve.params if isinstance(p, click.Option)]
    missing = [p.name for p in options if not p.envvar]
    assert missing == []
    assert all(str(p.envvar).startswith("LORACAT_") for p in options)


def test_health_answers_for_a_catalog_and_waits_for_one_that_is_not_there(served):
    assert run(served.address, "health").stdout.strip() == f"serving at {served.address}"
    started = time.monotonic()
    gone = run(f"127.0.0.1:{free_port()}", "health", "--wait", "1", check=False)
    assert gone.returncode == 6 and "unavailable" in gone.stderr
    assert 1 <= time.monotonic() - started < 10
