"""Every code block of README.md runs as written, in order, against a fresh `loracat serve`.

Blocks are fenced with a language: ``python`` and ``bash`` blocks run (in one scratch folder with
a ``.venv`` link to this checkout's, a private ``$HOME`` and a free port handed to the server and
the clients through ``LORACAT_PORT`` and ``LORACAT_SERVER``); ``text`` blocks are pictures and
listings. A block right after an HTML comment starting ``<!-- not run by`` is skipped; the
comment says why. A block without a language fails the test, so a new block cannot slip by.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUNNABLE = ("python", "bash")
SKIP_MARK = "<!-- not run by"
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    code: str
    skipped: bool


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` in order (the line of their opening fence, 1-based)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    position = 0
    while position < len(lines):
        opening = FENCE.match(lines[position])
        if opening is None:
            position += 1
            continue
        start = position
        position += 1
        body: list[str] = []
        while not lines[position].startswith("```"):
            body.append(lines[position])
            position += 1
        previous = lines[start - 1] if start else ""
        blocks.append(
            Block(
                start + 1, opening.group(1), "\n".join(body) + "\n", previous.startswith(SKIP_MARK)
            )
        )
        position += 1
    return blocks


def test_every_readme_block_declares_its_language():
    blocks = readme_blocks(README.read_text())
    assert blocks, "README.md has no code blocks?"
    unlabelled = [b.line for b in blocks if not b.language]
    assert unlabelled == [], f"README.md blocks without a language at lines {unlabelled}"
    unknown = sorted({b.language for b in blocks} - {*RUNNABLE, "text"})
    assert unknown == [], f"README.md blocks in languages this test cannot run: {unknown}"


@pytest.mark.slow
def test_readme_blocks_run_as_written(tmp_path: Path):
    blocks = [b for b in readme_blocks(README.read_text()) if b.language in RUNNABLE]
    assert [b for b in blocks if not b.skipped], "no runnable block found"
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "LORACAT_PORT": str(port),
        "LORACAT_SERVER": f"127.0.0.1:{port}",
        "LORACAT_CACHE_BYTES": "256M",
        "PYTHONPATH": str(ROOT),
        # a reader runs the blocks in one shell: after the first block's `source
        # .venv/bin/activate`, later blocks find `loracat` on PATH
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # the bash blocks start `loracat serve &`: one session for all of them, ended at the end
    sessions: list[int] = []
    try:
        for number, block in enumerate(blocks):
            if block.skipped:
                continue
            log = tmp_path / f"block-{number}-line-{block.line}.log"
            script = tmp_path / f"block-{number}.{'py' if block.language == 'python' else 'sh'}"
            script.write_text(block.code)
            command = (
                [sys.executable, str(script)]
                if block.language == "python"
                else ["bash", "-e", "-o", "pipefail", str(script)]
            )
            with open(log, "wb") as out:
                # output to a file, not a pipe: a server left running must not hold it open
                proc = subprocess.Popen(
                    command,
                    cwd=work,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                sessions.append(proc.pid)
                status = proc.wait(timeout=600)
            assert status == 0, (
                f"README.md block at line {block.line} ({block.language}) exited {status}:\n"
                + log.read_text()[-3000:]
            )
    finally:
        for session in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session, signal.SIGTERM)
    # what the blocks were to leave behind
    assert (work / "out" / "adapter_model.safetensors").is_file()
    assert (work / "out" / "README.md").is_file()  # the model card came back
    assert (tmp_path / "home" / ".loracat" / "index").is_dir()
    shell = "\n".join(log.read_text() for log in sorted(tmp_path.glob("block-*.log")))
    for line in (
        "pushed acme/support@3 ",
        "acme/support@serving: 3 -> 2",
        "acme/support@serving: 2 -> 3",
        "would delete 1 blob(s)",  # revision 1's pack, which nothing else references
        "purged acme/trial (1 deleted revision(s) forgotten)",
        "0 problem(s)",
    ):
        assert line in shell, f"{line!r} not in the README blocks' output:\n{shell[-3000:]}"
