"""Fixtures shared by every test package: real stores, including a real S3 server."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # Triton decides when a kernel is decorated (its own library's when it is imported) whether
    # it runs interpreted, and any test package may import the engine first: the engine's
    # kernel tests run on CPU through the interpreter (lora_kernels.INTERPRET_ON_CPU opts in
    # per test). The switch stays on in this process only: no child process (vLLM, loracat
    # serve) inherits it.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton

        triton.knobs.runtime.interpret = True
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.errors import FailedPrecondition
from catalog.testing.seaweedfs import SeaweedFS

#: One bucket for the whole session; each test gets its own prefix in it.
TEST_BUCKET = "loracat-tests"


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """One real SeaweedFS S3 server for the session, with :data:`TEST_BUCKET` created.

    A missing ``weed`` binary fails the test: the S3 backend is tested against a real server
    or not at all, never silently skipped.
    """
    server = SeaweedFS()
    try:
        server.start()
    except FailedPrecondition as exc:
        pytest.fail(f"cannot run S3 tests: {exc}", pytrace=False)
    try:
        server.create_bucket(TEST_BUCKET)
        yield server
    finally:
        server.stop(timeout=3)  # its data is temporary: no need to wait for a slow clean exit


@pytest.fixture
def s3_store_url(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://loracat-tests/<fresh prefix>``, with the ``AWS_*`` environment pointing at the
    session's SeaweedFS, so ``open_store(url)`` needs no options."""
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return f"s3://{TEST_BUCKET}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def file_store_url(tmp_path: Path) -> str:
    """``file:///.../store`` in the test's temporary directory (created on open)."""
    return (tmp_path / "store").as_uri()
