"""The engine plugin against a catalog served with --auth: a CatalogClient made with an engine
principal's token is all it needs (register, fetch, residency reports, hint streams)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.errors import PermissionDenied, Unauthenticated
from catalog.service.auth import Authenticator, Guard, token_sha256
from catalog.service.server import create_server, open_catalog
from engine_plugin import ResidentEngine
from engine_plugin.hints import HintFollower
from tests.engine.conftest import Arch, llama, make_ids, rel_err  # noqa: F401

ENGINE_TOKEN, WRITER_TOKEN = "engine-token-41", "writer-token-42"


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f'[[principal]]\nname = "gpu-node-1"\ntoken_sha256 = "{token_sha256(ENGINE_TOKEN)}"\n'
        'tenants = ["t"]\nrole = "engine"\n\n'
        f'[[principal]]\nname = "trainer"\ntoken_sha256 = "{token_sha256(WRITER_TOKEN)}"\n'
        'tenants = ["*"]\nrole = "write"\n'
    )
    catalog = open_catalog(tmp_path / "root")
    server, port = create_server(catalog, "127.0.0.1:0", guard=Guard(Authenticator(auth)))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()
        catalog.close()


def test_engine_serves_follows_hints_and_reports_with_a_token(
    llama: Arch,  # noqa: F811
    address: str,
) -> None:
    with CatalogClient(address, token=WRITER_TOKEN) as trainer:
        trainer.push("t/qv-r8", llama.packs["t/qv-r8"], aliases=("serving",))
        trainer.push("victim/secret", llama.packs["t/all-r4"], aliases=("serving",))
        with CatalogClient(address) as anonymous, pytest.raises(Unauthenticated):
            ResidentEngine(
                llama.fresh_base(), catalog=anonymous, num_slots=2, max_rank=16,
                base_id=llama.base_id,
            )  # fmt: skip
        with CatalogClient(address, token=ENGINE_TOKEN) as client:
            engine = ResidentEngine(
                llama.fresh_base(), catalog=client, num_slots=2, max_rank=16,
                base_id=llama.base_id,
            )  # fmt: skip
            with engine:
                engine.attach("t/qv-r8@serving")
                ids = make_ids(1, 6, seed=3)
                logits = engine.forward(ids, ["t/qv-r8"]).logits
                assert rel_err(logits[0], llama.reference_logits("t/qv-r8", ids)[0]) <= 1e-4
                with pytest.raises(PermissionDenied):
                    engine.attach("victim/secret@serving")
                engine.flush_reports()

                follower = HintFollower(engine, client)
                try:
                    # deployment waves: the trainer moves `serving`, the engine is told; moved
                    # back and forth until the stream (opened in the background) sees one
                    pushed = trainer.push("t/qv-r8", llama.packs["t/ko-r2-bf16"]).revision
                    for attempt in range(20):
                        target = pushed.number if attempt % 2 == 0 else 1
                        trainer.set_alias("t/qv-r8", "serving", target)
                        if follower.wait_for(1, timeout=1.0):
                            break
                    assert follower.counters["attach"] >= 1
                    assert follower.counters["refused"] == 0
                finally:
                    follower.close()


def test_the_demo_runs_with_tokens(tmp_path: Path) -> None:
    from engine_plugin.demo import run_demo

    stats = run_demo(
        root=tmp_path / "demo", adapters=8, num_slots=4, waves=1, batches_per_wave=1, auth=True
    )
    assert stats["catalog"]["revisions"] >= 8
    assert stats["catalog"]["store_url"] == "file://"  # the trainer is no admin
