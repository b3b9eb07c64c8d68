"""`loracat serve --auth` as deployed: a real server process, the CLI with --token and
$LORACAT_TOKEN, revocation by SIGHUP, the audit log, and the refusal of an open bind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.errors import PermissionDenied, Unauthenticated
from tests.security.conftest import ROOT_TOKEN, TOKENS, auth_toml
from tests.servers import loracat_command, serve_subprocess


@pytest.fixture
def auth_server(tmp_path: Path, packs: dict[str, bytes]) -> Iterator[tuple[str, Path, Path, int]]:
    """(address, auth file, audit log, pid) of `loracat serve --auth --audit-log`, with
    ``acme/own`` and ``victim/other`` pushed."""
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(auth_toml())
    audit = tmp_path / "audit.log"
    args = ["--auth", str(auth_file), "--audit-log", str(audit)]
    with serve_subprocess(
        tmp_path / "root", extra_args=args, client_options={"token": ROOT_TOKEN}
    ) as (proc, address):
        with CatalogClient(address, token=ROOT_TOKEN) as root:
            root.push("acme/own", packs["qv-r4"], aliases=["serving"])
            root.push("victim/other", packs["down-r2"], aliases=["serving"])
        yield address, auth_file, audit, proc.pid


def cli(
    address: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORACAT_")}
    return subprocess.run(
        [*loracat_command(), *args, "--server", address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )


def _until(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_cli_with_and_without_token(auth_server: tuple[str, Path, Path, int]) -> None:
    address = auth_server[0]
    refused = cli(address, "ls")
    assert refused.returncode != 0
    assert "requires a token" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    wrong = cli(address, "ls", "--token", "nope")
    assert wrong.returncode != 0 and "not valid" in wrong.stderr

    listed = cli(address, "ls", "--json", env={"LORACAT_TOKEN": TOKENS["read"]})
    assert listed.returncode == 0, listed.stderr
    assert "acme/own" in listed.stdout and "victim" not in listed.stdout

    for ref in ("victim/other", "victim/nope"):
        denied = cli(address, "show", ref, "--token", TOKENS["write"])
        assert denied.returncode != 0
        assert "may not act on tenant 'victim'" in denied.stderr

    reader_push = cli(address, "alias", "set", "acme/own", "canary", "1", "--token", TOKENS["read"])
    assert reader_push.returncode != 0 and "needs the write capability" in reader_push.stderr
    writer = cli(address, "alias", "set", "acme/own", "canary", "1", "--token", TOKENS["write"])
    assert writer.returncode == 0, writer.stderr
    # who did it: alias history names the mover, show the pusher
    history = cli(address, "alias", "history", "acme/own", "canary", "--token", TOKENS["read"])
    assert history.returncode == 0, history.stderr
    assert "write-user" in history.stdout.splitlines()[-1]
    shown = cli(address, "show", "acme/own", "--json", "--token", TOKENS["read"])
    assert json.loads(shown.stdout)["metadata"]["provenance.principal"] == "root"


def test_sighup_revokes_a_token_without_restart(auth_server: tuple[str, Path, Path, int]) -> None:
    address, auth_file, _, pid = auth_server
    with CatalogClient(address, token=TOKENS["read"]) as reader:
        assert reader.resolve("acme/own").number == 1
        auth_file.write_text(auth_toml({k: v for k, v in TOKENS.items() if k != "read"}))
        os.kill(pid, signal.SIGHUP)

        def revoked() -> bool:
            try:
                reader.resolve("acme/own")
            except Unauthenticated:
                return True
            return False

        assert _until(revoked)
    # a broken file on the next SIGHUP keeps the principals in force
    auth_file.write_text("[[principal]]\nname = 'x'\n")
    os.kill(pid, signal.SIGHUP)
    with CatalogClient(address, token=TOKENS["write"]) as writer:
        time.sleep(0.5)  # give the handler its turn; nothing may change
        assert writer.resolve("acme/own").number == 1


def test_audit_log_has_a_line_per_write_and_no_token(
    auth_server: tuple[str, Path, Path, int], packs: dict[str, bytes]
) -> None:
    address, _, audit, _ = auth_server
    with CatalogClient(address, token=TOKENS["write"]) as writer:
        writer.set_alias("acme/own", "canary", 1)
        writer.resolve("acme/own")  # a read: no line
        with pytest.raises(PermissionDenied):
            writer.set_alias("victim/other", "serving", 1)

    def lines() -> list[dict[str, object]]:
        return [json.loads(line) for line in audit.read_text().splitlines()]

    assert _until(lambda: len(lines()) >= 4)
    text = audit.read_text()
    assert all(token not in text for token in (*TOKENS.values(), ROOT_TOKEN))
    mine = [line for line in lines() if line["principal"] == "write-user"]
    assert [(line["method"], line["target"], line["outcome"]) for line in mine] == [
        ("SetAlias", "acme/own", "OK"),
        ("SetAlias", "victim/other", "PERMISSION_DENIED"),
    ]
    # on the catalog's host a push names a file in its inbox: the same line, its own method
    pushes = [line for line in lines() if line["method"] in ("Push", "PushFromInbox")]
    assert [(p["principal"], p["target"]) for p in pushes] == [
        ("root", "acme/own"),
        ("root", "victim/other"),
    ]


def test_open_bind_without_auth_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*loracat_command(), "serve", "--root", str(tmp_path), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "refusing to serve 0.0.0.0 without --auth" in proc.stderr
    assert not (tmp_path / "index").exists()  # refused before anything was opened


def test_audit_log_without_auth_names_the_anonymous_caller(
    tmp_path: Path, packs: dict[str, bytes]
) -> None:
    from catalog.service.auth import Guard, open_audit_log
    from catalog.service.server import create_server, open_catalog

    path = tmp_path / "audit.log"
    audit = open_audit_log(str(path))
    catalog = open_catalog(tmp_path / "root")
    server, port = create_server(catalog, "127.0.0.1:0", guard=Guard(None, audit))
    try:
        with CatalogClient(f"127.0.0.1:{port}") as client:
            client.push("acme/open", packs["qv-r4"])
            client.resolve("acme/open")
            client.gc(dry_run=True)
    finally:
        server.stop(grace=None).wait()
        catalog.close()
        for handler in list(audit.handlers):
            audit.removeHandler(handler)
            handler.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # on the catalog's host the push names a file in its inbox (catalog.local_push)
    assert [(line["principal"], line["method"], line["outcome"]) for line in lines] == [
        ("", "GetPushInbox", "OK"),
        ("", "PushFromInbox", "OK"),
        ("", "GarbageCollect", "OK"),
    ]


@pytest.mark.parametrize(
    ("host", "authenticated", "insecure", "refused"),
    [
        ("127.0.0.1", False, False, False),
        ("::1", False, False, False),
        ("localhost", False, False, False),
        ("0.0.0.0", False, False, True),
        ("::", False, False, True),
        ("catalog.internal", False, False, True),
        ("0.0.0.0", True, False, False),
        ("0.0.0.0", False, True, False),
    ],
)
def test_which_binds_need_auth(
    host: str, authenticated: bool, insecure: bool, refused: bool
) -> None:
    from catalog.errors import InvalidArgument
    from catalog.service.auth import check_exposure

    if refused:
        with pytest.raises(InvalidArgument, match="without --auth"):
            check_exposure(host, authenticated=authenticated, insecure=insecure)
    else:
        check_exposure(host, authenticated=authenticated, insecure=insecure)
