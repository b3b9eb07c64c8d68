"""Stagings kept with the fetched buffer they borrow: served only to a fetch of that very
object, never beyond its life, never instead of the checks a colocated read makes."""

from __future__ import annotations

import gc
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.client import CatalogClient
from catalog.errors import DataLoss
from catalog.model import Revision
from catalog.pack import TensorBytes, read_pack, write_pack
from engine_plugin import ResidentEngine
from engine_plugin.kept_stagings import KeptStagings, borrows_only
from engine_plugin.staging import StagedAdapter, stage_pack
from tests.colocated.conftest import Served
from tests.colocated.test_colocated_reads import blob_file
from tests.engine.conftest import Arch, llama, make_ids
from tests.pack.synth import random_tensors, small_manifest

__all__ = ["llama"]  # the session fixture, shared with tests/engine


def _finite_pack() -> bytes:
    """A small F32 pack of normal values (random bytes would hold NaNs)."""
    manifest = small_manifest()
    rng = np.random.default_rng(7)
    tensors = {
        name: TensorBytes(
            "F32",
            tb.shape,
            memoryview(rng.standard_normal(tb.data.nbytes // 4, dtype=np.float32).tobytes()),
        )
        for name, tb in random_tensors(manifest).items()
    }
    return write_pack(manifest, tensors)


PACK = _finite_pack()


def _mapped(path: Path, data: bytes) -> memoryview:
    """``data`` written to ``path`` and mapped read-only (as a colocated read of a store file)."""
    path.write_bytes(data)
    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)).toreadonly()


def _revision(number: int = 1) -> Revision:
    from catalog.digest import Digest
    from catalog.model import AdapterName

    manifest = read_pack(PACK).manifest
    return Revision(
        adapter=AdapterName.parse("t/kept"),
        number=number,
        digest=Digest.of(PACK),
        base_id=manifest.base_id,
        rank=manifest.rank,
        alpha=manifest.alpha,
        dtype=manifest.dtype,
        size_bytes=len(PACK),
        created_at=0.0,
        target_modules=manifest.target_modules,
        num_layers=manifest.num_layers,
        num_experts=0,
    )


def _stage(data: object, dtype: torch.dtype = torch.float32) -> StagedAdapter:
    return stage_pack(
        _revision(),
        read_pack(data),
        dtype=dtype,
        borrow=True,
        borrow_b=True,  # type: ignore[arg-type]
    )


def test_a_kept_staging_serves_only_the_buffer_it_borrows(tmp_path: Path) -> None:
    data = _mapped(tmp_path / "pack", PACK)
    staged = _stage(data)
    assert borrows_only(staged, data)
    kept = KeptStagings()
    revision = _revision()
    assert kept.keep(data, staged, into_slot=True, vouched=False)
    assert kept.get(revision, data, into_slot=True, vouched=False) is staged
    assert kept.get(revision, data, into_slot=False, vouched=False) is None  # another way
    # The same bytes in another object (a map made afresh, a copy): staged anew.
    assert (
        kept.get(revision, _mapped(tmp_path / "copy", PACK), into_slot=True, vouched=False) is None
    )
    assert kept.get(revision, memoryview(PACK), into_slot=True, vouched=False) is None
    # Another revision with the same bytes gets the same tensors under its own revision.
    other = _revision(number=2)
    again = kept.get(other, data, into_slot=True, vouched=False)
    assert again is not None and again.revision == other and again.modules == staged.modules
    assert kept.counters == {"hits": 2, "kept": 1}


def test_a_staging_that_skipped_the_finite_checks_serves_only_vouched_fetches(
    tmp_path: Path,
) -> None:
    data = _mapped(tmp_path / "pack", PACK)
    kept = KeptStagings()
    assert kept.keep(data, _stage(data), into_slot=True, vouched=True)
    assert kept.get(_revision(), data, into_slot=True, vouched=False) is None
    assert kept.get(_revision(), data, into_slot=True, vouched=True) is not None


def test_private_copies_and_bytes_are_never_kept(tmp_path: Path) -> None:
    kept = KeptStagings()
    data = _mapped(tmp_path / "pack", PACK)
    converted = _stage(data, dtype=torch.float16)  # a conversion: private tensors
    assert not borrows_only(converted, data)
    assert not kept.keep(data, converted, into_slot=True, vouched=False)
    assert not kept.keep(PACK, _stage(PACK), into_slot=True, vouched=False)  # no weak refs
    writable = memoryview(bytearray(PACK))
    assert not kept.keep(writable, _stage(writable), into_slot=True, vouched=False)
    assert len(kept) == 0


def test_an_entry_goes_with_its_buffer_and_beyond_the_bound(tmp_path: Path) -> None:
    kept = KeptStagings(max_entries=2)
    data = _mapped(tmp_path / "pack", PACK)
    assert kept.keep(data, _stage(data), into_slot=True, vouched=False)
    assert len(kept) == 1
    del data  # the source let go of its buffer: the staging goes too
    gc.collect()
    assert len(kept) == 0
    buffers = [memoryview(bytes(PACK)).toreadonly() for _ in range(3)]
    for buffer in buffers:
        assert kept.keep(buffer, _stage(buffer), into_slot=True, vouched=False)
    assert len(kept) == 2  # the least recently used went
    assert kept.get(_revision(), buffers[0], into_slot=True, vouched=False) is None
    assert kept.get(_revision(), buffers[2], into_slot=True, vouched=False) is not None


def _attach_fetching(engine: ResidentEngine, name: str) -> None:
    """Attach ``name`` with its staging gone from the host tier, so the attach fetches."""
    revision = engine.catalog.resolve(name)
    engine.detach(name)
    engine.host.remove(str(revision.digest))
    engine.attach(name)


def test_a_repeated_colocated_attach_reuses_the_staging_and_still_checks_every_chunk(
    llama: Arch, served: Served
) -> None:
    name = "t/all-r4"
    ids = make_ids(2, 5)
    with CatalogClient(served.address) as client:
        revision = client.push(name, llama.packs[name]).revision
        engine = ResidentEngine(
            llama.fresh_base(), catalog=client, num_slots=2, max_rank=16, base_id=llama.base_id
        )
        with engine:
            engine.attach(name)
            want = engine.forward(ids, [name, None]).logits
            _attach_fetching(engine, name)
            assert engine.stats()["kept_stagings"]["hits"] == 1  # the kept map's staging, reused
            assert torch.equal(engine.forward(ids, [name, None]).logits, want)
            # A byte flipped in the store file under the kept map (its time put back): the
            # read's checks refuse it, whatever staging is kept for that map.
            blob = blob_file(served, revision.digest)
            status = blob.stat()
            at = len(llama.packs[name]) - 5
            with open(blob, "r+b") as f:
                f.seek(at)
                f.write(bytes([llama.packs[name][at] ^ 0xFF]))
            os.utime(blob, ns=(status.st_atime_ns, status.st_mtime_ns))
            with pytest.raises(DataLoss):
                _attach_fetching(engine, name)
            assert engine.stats()["kept_stagings"]["hits"] == 1
            assert name not in engine.stats()["bindings"]
