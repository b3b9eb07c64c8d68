"""``ExportPeftDir``: the catalog writes a revision's PEFT files for a colocated engine, only
into a directory under its ``--peft-export-root`` that holds the caller's nonce. Real gRPC on
loopback, a real catalog, real PEFT adapters."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.errors import (
    DataLoss,
    FailedPrecondition,
    IncompatibleAdapter,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from catalog.events import blob_key
from catalog.model import AdapterName
from catalog.pack import export_peft_dir, import_peft_dir
from catalog.peft_export import NONCE_FILE, PeftExporter
from catalog.service.server import create_server, open_catalog
from tests import factories

NONCE = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = factories.build_model(factories.tiny_llama_config())
    return factories.make_peft_adapter(
        model, tmp_path_factory.mktemp("peft") / "a", rank=4, target_modules=("q_proj", "v_proj")
    )


@contextmanager
def serving(root: Path, export_root: Path | None) -> Iterator[CatalogClient]:
    catalog = open_catalog(root)
    server, port = create_server(catalog, "127.0.0.1:0", peft_export_root=export_root)
    try:
        with CatalogClient(f"127.0.0.1:{port}", timeout=20) as client:
            yield client
    finally:
        server.stop(None).wait()
        catalog.close()


def dest_with_nonce(parent: Path, nonce: str = NONCE) -> Path:
    dest = parent / "tmp" / "1234-abcd"
    dest.mkdir(parents=True)
    (dest / NONCE_FILE).write_text(nonce)
    return dest


def test_the_catalog_writes_the_same_peft_files_the_client_would(
    tmp_path: Path, peft_dir: Path
) -> None:
    export_root = tmp_path / "node"
    export_root.mkdir()
    with serving(tmp_path / "catalog", export_root) as client:
        pushed = client.push("acme/a", import_peft_dir(peft_dir, base_id="org/base"))
        pinned = f"acme/a@{pushed.revision.digest}"
        dest = dest_with_nonce(export_root)
        revision, written = client.export_peft_dir(pinned, dest, nonce=NONCE)
        assert revision == pushed.revision
        here = tmp_path / "here"
        export_peft_dir(client.fetch(pinned), here, fsync=False)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (dest / name).read_bytes() == (here / name).read_bytes()
        assert written == sum(
            (here / n).stat().st_size for n in ("adapter_model.safetensors", "adapter_config.json")
        )
        # The nonce file is the caller's: the catalog neither removes nor publishes anything.
        assert sorted(p.name for p in dest.iterdir()) == sorted(
            [NONCE_FILE, "adapter_model.safetensors", "adapter_config.json"]
        )
        with pytest.raises(NotFound):
            client.export_peft_dir("acme/missing@1", dest, nonce=NONCE)


def test_every_destination_check_refuses_before_writing(tmp_path: Path, peft_dir: Path) -> None:
    export_root = tmp_path / "node"
    export_root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / NONCE_FILE).write_text(NONCE)
    (export_root / "escape").symlink_to(outside)
    (export_root / NONCE_FILE).write_text(NONCE)
    unmarked = export_root / "tmp" / "unmarked"
    unmarked.mkdir(parents=True)
    marked = dest_with_nonce(export_root / "other")
    with serving(tmp_path / "catalog", export_root) as client:
        client.push("acme/a", import_peft_dir(peft_dir, base_id="org/base"))
        refusals = [
            (outside, NONCE, PermissionDenied),  # not under the root
            (export_root / "escape", NONCE, PermissionDenied),  # a link out of it
            (export_root, NONCE, PermissionDenied),  # the root itself
            (export_root / "tmp" / ".." / ".." / "outside", NONCE, PermissionDenied),
            (unmarked, NONCE, FailedPrecondition),  # no nonce: another host, or not ours
            (marked, "f" * 32, FailedPrecondition),  # another caller's nonce
            (marked, "short", InvalidArgument),
        ]
        for dest, nonce, error in refusals:
            with pytest.raises(error):
                client.export_peft_dir("acme/a@1", dest, nonce=nonce)
        with pytest.raises(InvalidArgument, match="absolute"):
            client.export_peft_dir("acme/a@1", "tmp/unmarked", nonce=NONCE)
    for directory in (outside, unmarked, marked, export_root):
        assert not (directory / "adapter_model.safetensors").exists()


def test_a_catalog_without_an_export_root_writes_nothing(tmp_path: Path, peft_dir: Path) -> None:
    with serving(tmp_path / "catalog", None) as client:
        client.push("acme/a", import_peft_dir(peft_dir, base_id="org/base"))
        dest = dest_with_nonce(tmp_path / "node")
        with pytest.raises(FailedPrecondition, match="--peft-export-root"):
            client.export_peft_dir("acme/a@1", dest, nonce=NONCE)
        assert sorted(p.name for p in dest.iterdir()) == [NONCE_FILE]


def test_the_export_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not an existing directory"):
        PeftExporter(tmp_path / "missing")


def test_the_async_client_exports_too(tmp_path: Path, peft_dir: Path) -> None:
    import asyncio

    from catalog.client import AsyncCatalogClient

    export_root = tmp_path / "node"
    export_root.mkdir()
    catalog = open_catalog(tmp_path / "catalog")
    server, port = create_server(catalog, "127.0.0.1:0", peft_export_root=export_root)
    try:
        with CatalogClient(f"127.0.0.1:{port}") as client:
            client.push("acme/a", import_peft_dir(peft_dir, base_id="org/base"))
        dest = dest_with_nonce(export_root)

        async def run() -> int:
            async with AsyncCatalogClient(f"127.0.0.1:{port}") as aio:
                revision, written = await aio.export_peft_dir("acme/a@1", dest, nonce=NONCE)
                assert revision.number == 1
                return written

        assert (
            asyncio.run(run())
            == (dest / "adapter_model.safetensors").stat().st_size
            + (dest / "adapter_config.json").stat().st_size
        )
    finally:
        server.stop(None).wait()
        catalog.close()


def test_a_cold_export_is_answered_from_the_durable_bytes_and_fills_the_tier_after(
    tmp_path: Path, peft_dir: Path
) -> None:
    export_root = tmp_path / "node"
    export_root.mkdir()
    with serving(tmp_path / "catalog", export_root) as client:
        pushed = client.push("acme/a", import_peft_dir(peft_dir, base_id="org/base"))
        digest = str(pushed.revision.digest)
        with contextlib.suppress(NotFound):  # a push may not fill the tier
            client.evict_pack("acme/a@1")
        assert digest not in {e["digest"] for e in client.list_cache()}
        client.export_peft_dir("acme/a@1", dest_with_nonce(export_root), nonce=NONCE)
        deadline = time.monotonic() + 20
        while digest not in {e["digest"] for e in client.list_cache()}:
            assert time.monotonic() < deadline, "the tier was never filled"
            time.sleep(0.05)
        # A hit is read from the tier, with nothing left to fill.
        dest = export_root / "tmp" / "second"
        dest.mkdir()
        (dest / NONCE_FILE).write_text(NONCE)
        client.export_peft_dir("acme/a@1", dest, nonce=NONCE)
        assert (dest / "adapter_model.safetensors").read_bytes() == (
            export_root / "tmp" / "1234-abcd" / "adapter_model.safetensors"
        ).read_bytes()


def test_read_pack_bytes_deferred(tmp_path: Path, peft_dir: Path) -> None:
    catalog = open_catalog(tmp_path / "catalog")
    try:
        revision, _ = catalog.push_bytes(
            AdapterName.parse("acme/a"), import_peft_dir(peft_dir, base_id="org/base")
        )
        with contextlib.suppress(NotFound):
            catalog.evict_pack("acme/a@1")
        read = catalog.read_pack_bytes_deferred(revision)
        assert read.verify is not None and read.fill is not None
        assert read.data == catalog.store.get(blob_key(revision.digest))
        read.verify()
        assert catalog.pack_cache is not None
        assert not catalog.pack_cache.contains(revision.digest)
        read.fill()
        assert catalog.pack_cache.contains(revision.digest)
        hit = catalog.read_pack_bytes_deferred(revision)
        assert (hit.verify, hit.fill, hit.data) == (None, None, read.data)
    finally:
        catalog.close()


def test_a_corrupt_durable_copy_is_data_loss_and_leaves_no_files(
    tmp_path: Path, peft_dir: Path
) -> None:
    export_root = tmp_path / "node"
    export_root.mkdir()
    catalog = open_catalog(tmp_path / "catalog")
    server, port = create_server(catalog, "127.0.0.1:0", peft_export_root=export_root)
    try:
        with CatalogClient(f"127.0.0.1:{port}") as client:
            pushed = client.push("acme/a", import_peft_dir(peft_dir, base_id="org/base"))
            digest = pushed.revision.digest
            with contextlib.suppress(NotFound):
                client.evict_pack("acme/a@1")
            key = blob_key(digest)
            good = catalog.store.get(key)
            assert good is not None
            # Same length, one flipped byte deep in the tensors: the pack still parses and
            # exports; only the digest check can tell.
            bad = bytearray(good)
            bad[-10] ^= 0xFF
            catalog.store.put(key, bytes(bad))
            dest = dest_with_nonce(export_root)
            with pytest.raises(DataLoss, match="corrupt in the durable store"):
                client.export_peft_dir("acme/a@1", dest, nonce=NONCE)
            assert sorted(p.name for p in dest.iterdir()) == [NONCE_FILE]
            assert not catalog.pack_cache or not catalog.pack_cache.contains(digest)
    finally:
        server.stop(None).wait()
        catalog.close()


def test_a_revision_that_does_not_fit_is_refused_before_a_byte_is_read(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_root = tmp_path / "node"
    export_root.mkdir()
    catalog = open_catalog(tmp_path / "catalog")
    reads: list[object] = []
    read = catalog.read_pack_bytes_deferred

    def counted(revision):  # type: ignore[no-untyped-def]
        reads.append(revision)
        return read(revision)

    monkeypatch.setattr(catalog, "read_pack_bytes_deferred", counted)
    server, port = create_server(catalog, "127.0.0.1:0", peft_export_root=export_root)
    try:
        with CatalogClient(f"127.0.0.1:{port}", timeout=20) as client:
            client.push(
                "acme/a", import_peft_dir(peft_dir, base_id="org/base"), aliases=["serving"]
            )
            dest = dest_with_nonce(export_root / "d")
            misfits = [
                ({"served_base": "org/other"}, "trained for base 'org/base'"),
                ({"served_base": "org/base", "max_rank": 2}, "rank 4, above the engine's"),
            ]
            for fit, message in misfits:
                with pytest.raises(IncompatibleAdapter, match=message):
                    client.export_peft_dir("acme/a@serving", dest, nonce=NONCE, **fit)
                # The fit is checked before the destination: a wrong nonce is not reached.
                with pytest.raises(IncompatibleAdapter):
                    client.export_peft_dir("acme/a@serving", dest, nonce="f" * 32, **fit)
            assert reads == [] and sorted(p.name for p in dest.iterdir()) == [NONCE_FILE]
            # The served base, a rank that fits, a mutable ref:
            # resolved, written, and the revision it named answered.
            revision, written = client.export_peft_dir(
                "acme/a@serving", dest, nonce=NONCE, served_base="org/base", max_rank=4
            )
            assert revision.number == 1 and written > 0 and len(reads) == 1
            assert (dest / "adapter_model.safetensors").exists()
    finally:
        server.stop(None).wait()
        catalog.close()
