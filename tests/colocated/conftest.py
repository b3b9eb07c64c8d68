"""A `loracat serve` process with its NVMe tier, packs of several chunks, engine processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from catalog.pack import TensorBytes, write_pack
from catalog.pack.manifest import ModuleSpec
from tests.pack.synth import random_tensors, small_manifest
from tests.servers import serve_subprocess

REPO = Path(__file__).resolve().parents[2]


def big_pack(mib: int, seed: int) -> bytes:
    """A valid pack of about ``mib`` MiB (F32, rank 16, a 4096 x 4096 q_proj in ``2 * mib``
    layers, 512 KiB each): several 1 MiB cache chunks, the last one short."""
    layers = 2 * mib
    manifest = small_manifest(
        num_layers=layers,
        rank=16,
        alpha=32.0,
        modules=(
            ModuleSpec(
                "self_attn.q_proj",
                in_features=4096,
                out_features=4096,
                rank=16,
                alpha=32.0,
                layers=tuple(range(layers)),
            ),
        ),
    )
    rng = np.random.default_rng(seed)
    tensors = {
        name: TensorBytes(
            "F32",
            tb.shape,
            memoryview(rng.standard_normal(tb.data.nbytes // 4, dtype=np.float32).tobytes()),
        )
        for name, tb in random_tensors(manifest, seed=seed).items()
    }
    return write_pack(manifest, tensors)  # random and finite: every 64-byte run is unique


@dataclass
class Served:
    """A catalog process, where it listens, and its directories."""

    process: subprocess.Popen[bytes]
    address: str
    root: Path
    store: Path

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"


@contextmanager
def serving(root: Path, store: Path, *, cache_bytes: str = "64M") -> Iterator[Served]:
    """`loracat serve` on ``root`` over the ``file://`` store ``store``."""
    args = ("--cache-bytes", cache_bytes)
    with serve_subprocess(root, store.as_uri(), extra_args=args) as (process, address):
        yield Served(process, address, root, store)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A catalog whose ``file://`` store shares the NVMe tier's filesystem: the tier holds
    references to the store's files, not copies."""
    with serving(tmp_path / "root", tmp_path / "store") as running:
        yield running


@pytest.fixture
def other_filesystem() -> Iterator[Path]:
    """A directory on another filesystem than the tests' temporary directories (tmpfs)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    directory = Path(tempfile.mkdtemp(prefix="loracat-test-", dir=shm))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def served_copies(tmp_path: Path, other_filesystem: Path) -> Iterator[Served]:
    """A catalog whose store is on another filesystem: the NVMe tier holds copies, in chunks."""
    with serving(tmp_path / "root-copies", other_filesystem / "store") as running:
        yield running


def child(*args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """An engine-side program of ``tests.colocated.children`` in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.colocated.children", *args],
        cwd=REPO,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(process: subprocess.Popen[str]) -> dict[str, Any]:
    """The child's next JSON line (its stderr in the error when it ended instead)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=30)
        stderr = process.stderr.read() if process.stderr else ""
        raise AssertionError(f"child exited {process.returncode} without output: {stderr}")
    result: dict[str, Any] = json.loads(line)
    return result


def finish(process: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """The child's last JSON line, once it exited 0."""
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result
