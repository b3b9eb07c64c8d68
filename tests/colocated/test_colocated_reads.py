"""The colocated read path against a real `loracat serve` process and its real LMDB NVMe tier.

The catalog always runs in a process of its own; engines are this test process or children
(``tests.colocated.children``), so every read here is a reader process beside the writer.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.client import CatalogClient
from catalog.client.colocated import CacheLocation, NotColocated, open_reader
from catalog.client.errors import translated
from catalog.digest import Digest
from catalog.errors import DataLoss, FailedPrecondition, InvalidArgument
from tests.colocated.conftest import (
    Served,
    big_pack,
    child,
    finish,
    read_line,
    serving,
)
from tests.servers import running_catalog

CHILD = (sys.executable, "-m", "tests.colocated.children")


def counters(client: CatalogClient) -> dict[str, int]:
    return dict(client.stats()["counters"])


def flip_cached_byte(cache_dir: Path, pack: bytes, offset: int) -> None:
    """Flip the byte at ``offset`` of ``pack`` where it lies in the NVMe tier's data file
    (found by content: the packs are random, so a 64-byte needle occurs once)."""
    needle = pack[offset : offset + 64]
    data_file = cache_dir / "data.mdb"
    raw = data_file.read_bytes()
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0, "the needle must occur exactly once"
    with open(data_file, "r+b") as f:
        f.seek(at)
        f.write(bytes([raw[at] ^ 0xFF]))


def evict_when_allowed(client: CatalogClient, ref: str, deadline_s: float) -> float:
    """Evict ``ref``'s pack as soon as no lease holds it; returns the seconds that took."""
    start = time.monotonic()
    while True:
        try:
            client.evict_pack(ref)
            return time.monotonic() - start
        except FailedPrecondition:
            if time.monotonic() - start > deadline_s:
                raise
            time.sleep(0.05)


# -- the path itself -------------------------------------------------------------------------


def test_a_whole_pack_is_read_from_the_nvme_tier_under_a_lease(served: Served) -> None:
    pack = big_pack(4, seed=1)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/big", pack).revision
        data = client.fetch("acme/big")
        assert data.readonly and bytes(data) == pack
        path = client.colocated
        assert path is not None and path.reason == ""
        assert path.counters == {
            "reads": 1,
            "unleased_reads": 0,
            "fallbacks": 0,
            "corrupt_reported": 0,
        }
        path.flush()
        stats = counters(client)
        assert stats["pack_leases"] == 1
        assert stats["lease_granted"] == stats["lease_released"] == 1
        assert stats["lease_active"] == 0
        # A revision resolved already, whole in the tier, is read without a lease; the read
        # is reported afterwards (batched; flush sends it now) and counts as a hit of the tier.
        hits = stats["nvme_hits"]
        again = client.fetch(revision)
        assert bytes(again) == pack and path.counters["reads"] == 2
        assert path.counters["unleased_reads"] == 1
        path.flush()
        stats = counters(client)
        assert stats["lease_granted"] == stats["lease_released"] == 1
        assert stats["pack_reads_reported"] == 1 and stats["nvme_hits"] == hits + 1
        assert stats["lease_active"] == 0
        # Released: the entry can go.
        client.evict_pack("acme/big")


class LateReleases:
    """A catalog stub whose ``ReleasePackLease.future`` reaches the catalog 0.3 s late."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.ReleasePackLease = self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def future(self, request: Any, timeout: float | None = None) -> Future[Any]:
        answer: Future[Any] = Future()

        def late() -> None:
            time.sleep(0.3)
            try:
                answer.set_result(self._stub.ReleasePackLease(request, timeout=timeout))
            except Exception as exc:  # handed to the caller through the future
                answer.set_exception(exc)

        threading.Thread(target=late, daemon=True).start()
        return answer


def test_a_fetch_then_an_evict_from_one_client_is_never_refused_for_its_own_lease(
    served: Served,
) -> None:
    # A colocated fetch returns before the catalog has its lease release; the client's own
    # evict waits for that release instead of being refused as "leased by an engine".
    # The catalog is made to take the release late (as on a loaded machine), so the race is
    # certain: the release arrives 0.3 s after the read returns.
    pack = big_pack(2, seed=11)
    with CatalogClient(served.address) as client:
        client.push("acme/big", pack)
        path = client.colocated
        assert path is not None
        path._stub = LateReleases(path._stub)  # type: ignore[assignment]
        for _ in range(3):
            assert bytes(client.fetch("acme/big")) == pack  # by reference: under a lease
            client.evict_pack("acme/big")
        assert path.counters["reads"] == 3 and path.counters["unleased_reads"] == 0


def test_ranges_and_colocated_false_take_the_stream(served: Served) -> None:
    pack = big_pack(3, seed=2)
    with CatalogClient(served.address) as client:
        client.push("acme/big", pack)
        assert bytes(client.fetch("acme/big", offset=1000, length=5000)) == pack[1000:6000]
        assert client.colocated is not None and client.colocated.counters["reads"] == 0
    with CatalogClient(served.address, colocated=False) as client:
        assert client.colocated is None
        assert bytes(client.fetch("acme/big")) == pack
        assert "pack_leases" not in counters(client)


def test_a_lease_keeps_the_entry_until_released(served: Served) -> None:
    pack = big_pack(2, seed=3)
    with CatalogClient(served.address) as client:
        client.push("acme/big", pack)
        stub = client._stub
        lease = stub.LeasePack(pb.LeasePackRequest(ref="acme/big", ttl_s=60))
        assert lease.revision.size_bytes == len(pack) and lease.ttl_s == 60
        with pytest.raises(FailedPrecondition, match="leased"):
            client.evict_pack("acme/big")
        # Pins and leases are counted apart: a pin/unpin leaves the lease in force.
        client.pin_pack("acme/big")
        client.unpin_pack("acme/big")
        with pytest.raises(FailedPrecondition, match="leased"):
            client.evict_pack("acme/big")
        released = stub.ReleasePackLease(pb.ReleasePackLeaseRequest(lease_id=lease.lease_id))
        assert released.released
        client.evict_pack("acme/big")
        again = stub.ReleasePackLease(pb.ReleasePackLeaseRequest(lease_id=lease.lease_id))
        assert not again.released
        with pytest.raises(InvalidArgument, match="600"), translated(client.target):
            stub.LeasePack(pb.LeasePackRequest(ref="acme/big", ttl_s=601))


def test_a_cold_pack_is_read_from_the_durable_tier_once_for_all_engines(served: Served) -> None:
    pack = big_pack(6, seed=4)
    with CatalogClient(served.address, colocated=False) as client:
        client.push("acme/big", pack)
        client.evict_pack("acme/big")  # the push admitted it to the tier: start cold
        before = counters(client)
        engines = [child("fetch-once", served.address, "acme/big") for _ in range(4)]
        results = [finish(engine) for engine in engines]
        after = counters(client)
    assert all(r["good"] and r["reads"] == 1 and r["fallbacks"] == 0 for r in results), results
    assert after["durable_reads"] - before.get("durable_reads", 0) == 1
    assert after["nvme_loads"] == 1 and after["pack_leases"] == 4


# -- a writer changing the tier while engines read -------------------------------------------


@pytest.mark.parametrize(
    "copies",
    [
        pytest.param(True, id="chunks"),
        pytest.param(False, id="references", marks=pytest.mark.slow),  # ~10 s, like chunks
    ],
)
def test_evict_rewrite_pin_unpin_while_engines_read(
    tmp_path: Path, copies: bool, request: pytest.FixtureRequest
) -> None:
    packs = {f"acme/p{i}": big_pack(4, seed=10 + i) for i in range(3)}
    # A store on another filesystem makes the tier hold copies (LMDB pages that a fill or an
    # eviction frees and reuses); on the same one it holds references to the store's files.
    store = (request.getfixturevalue("other_filesystem") if copies else tmp_path) / "store"
    # Room for about two of the three packs: fills evict each other.
    with (
        serving(tmp_path / "root", store, cache_bytes="9M") as served,
        CatalogClient(served.address, colocated=False) as writer,
    ):
        digests = {name: writer.push(name, pack).revision.digest for name, pack in packs.items()}
        readers = [
            child("fetch-loop", served.address, "acme/p0", str(digests["acme/p0"]), "40")
            for _ in range(2)
        ]
        churn = 0
        while any(r.poll() is None for r in readers):
            for name in ("acme/p1", "acme/p2"):
                assert bytes(writer.fetch(name)) == packs[name]  # fills: evictions
            try:
                writer.evict_pack("acme/p0")
                # Rewrite: the same bytes filled again, into other pages.
                assert bytes(writer.fetch("acme/p0")) == packs["acme/p0"]
            except FailedPrecondition:
                pass  # leased by a reader right now: that is the point
            except Exception as exc:  # NotFound: evicted by a fill already
                assert type(exc).__name__ == "NotFound", exc
            try:
                writer.pin_pack("acme/p0")
                writer.unpin_pack("acme/p0")
            except Exception as exc:
                assert type(exc).__name__ in {"NotFound", "ResourceExhausted"}, exc
            churn += 1
        results = [finish(r) for r in readers]
        stats = counters(writer)
    assert churn >= 3, "the writer must have churned while the readers read"
    for result in results:
        assert result["bad"] == 0 and result["errors"] == 0, result
        assert result["reads"] + result["fallbacks"] == 40 and result["reads"] > 0, result
    assert stats["nvme_evictions"] + stats["nvme_evicted_on_request"] > 0
    assert stats["nvme_corrupt_dropped"] == 0
    assert (stats["nvme_referenced_fills"] == 0) is copies


# -- crashes ---------------------------------------------------------------------------------


def test_sigkill_of_an_engine_mid_read_lets_its_lease_expire(served: Served) -> None:
    pack = big_pack(4, seed=5)
    with CatalogClient(served.address, colocated=False) as client:
        client.push("acme/big", pack)
        engine = child("pause-mid-read", served.address, "acme/big", "1.0", stdin=True)
        assert read_line(engine) == {"reading": True}
        with pytest.raises(FailedPrecondition, match="leased"):
            client.evict_pack("acme/big")
        engine.send_signal(signal.SIGKILL)
        engine.wait(timeout=30)
        waited = evict_when_allowed(client, "acme/big", deadline_s=20)
        stats = counters(client)
    assert waited < 20
    assert stats["lease_expired"] == 1 and stats["lease_active"] == 0
    # The dead engine's LMDB reader slot was freed too (it pinned the snapshot's pages).
    assert stats["lease_stale_readers_cleared"] >= 1


def test_sigkill_of_the_catalog_while_an_engine_reads(
    tmp_path: Path, other_filesystem: Path
) -> None:
    pack = big_pack(4, seed=6)
    # The engine reads chunks from LMDB pages (the store elsewhere: the tier holds copies).
    root, store = tmp_path / "root", other_filesystem / "store"
    with serving(root, store) as served:
        with CatalogClient(served.address, colocated=False) as client:
            revision = client.push("acme/big", pack).revision
        engine = child("pause-mid-read", served.address, "acme/big", "0", stdin=True)
        assert read_line(engine) == {"reading": True}
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(timeout=30)
        assert engine.stdin is not None
        engine.stdin.write("go\n")
        engine.stdin.flush()
        # The read was inside its LMDB transaction: it finishes with the verified bytes.
        result = finish(engine)
        assert result["good"] is True and result["reads"] == 1
    with serving(root, store) as restarted, CatalogClient(restarted.address) as client:
        assert client.verify()["problems"] == []
        assert bytes(client.fetch(revision)) == pack
        assert client.colocated is not None and client.colocated.counters["reads"] == 1
        assert counters(client)["nvme_corrupt_dropped"] == 0


# -- integrity -------------------------------------------------------------------------------


def test_a_flipped_byte_is_refused_then_repaired_from_the_durable_tier(
    served_copies: Served,
) -> None:
    served = served_copies
    pack = big_pack(4, seed=7)
    with CatalogClient(served.address) as client:
        client.push("acme/big", pack)  # admitted to the NVMe tier (one copy in its file)
        assert bytes(client.fetch("acme/big")) == pack
        flip_cached_byte(served.cache_dir, pack, offset=2 * (1 << 20) + 12345)
        data = client.fetch("acme/big")
        assert bytes(data) == pack
        path = client.colocated
        assert path is not None
        assert path.counters == {
            "reads": 2,
            "unleased_reads": 0,
            "fallbacks": 0,
            "corrupt_reported": 1,
        }
        stats = counters(client)
        assert stats["nvme_corrupt_dropped"] == 1
        assert stats["durable_reads"] == 1  # the repair (the push filled the tier)
        assert stats["pack_lease_corrupt_reports"] == 1


def test_a_resolved_revision_read_before_its_lease_is_still_checked_and_repaired(
    served_copies: Served,
) -> None:
    served = served_copies
    pack = big_pack(4, seed=27)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/big", pack).revision
        # The push admitted it to the NVMe tier: the read takes no lease.
        assert bytes(client.fetch(revision)) == pack
        path = client.colocated
        assert path is not None and path.counters["unleased_reads"] == 1
        flip_cached_byte(served.cache_dir, pack, offset=3 * (1 << 20) + 5)
        # The bad chunk fails the unleased read's check: the leased read finds it too and
        # reports it, the catalog refills it, and the bytes are right.
        assert bytes(client.fetch(revision)) == pack
        assert path.counters["corrupt_reported"] == 1
        assert path.counters["unleased_reads"] == 1
        assert bytes(client.fetch(revision)) == pack
        assert path.counters["unleased_reads"] == 2
        path.flush()
        stats = counters(client)
        assert stats["nvme_corrupt_dropped"] == 1
        assert stats["durable_reads"] == 1  # the repair (the push filled the tier)
        # Two leases for the repaired fetch (the read that failed and the read after the
        # refill), none for the first and last: they are reported.
        assert stats["lease_granted"] == stats["lease_released"] == 2
        assert stats["pack_reads_reported"] == 2


def test_a_byte_flipped_in_both_tiers_is_data_loss(served_copies: Served) -> None:
    served = served_copies
    pack = big_pack(3, seed=8)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/big", pack).revision
        assert bytes(client.fetch("acme/big")) == pack
        flip_cached_byte(served.cache_dir, pack, offset=(1 << 20) + 7)
        blob = served.store / "blobs" / "sha256" / revision.digest.hex[:2] / revision.digest.hex
        raw = bytearray(blob.read_bytes())
        raw[100] ^= 0xFF
        blob.write_bytes(bytes(raw))
        with pytest.raises(DataLoss, match="corrupt"):
            client.fetch("acme/big")


# -- a file:// store on the tier's filesystem: references, not copies --------------------------


def blob_file(served: Served, digest: Digest) -> Path:
    return served.store / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex


def test_a_local_store_is_referenced_not_copied(served: Served, served_copies: Served) -> None:
    packs = [big_pack(4, seed=20 + i) for i in range(3)]
    file_bytes = {}
    for label, catalog in (("references", served), ("copies", served_copies)):
        with CatalogClient(catalog.address) as client:
            for i, pack in enumerate(packs):
                client.push(f"acme/p{i}", pack)
                assert bytes(client.fetch(f"acme/p{i}")) == pack  # colocated: fills the tier
                with CatalogClient(catalog.address, colocated=False) as stream:
                    assert bytes(stream.fetch(f"acme/p{i}")) == pack  # the catalog's own read
            assert client.colocated is not None and client.colocated.counters["reads"] == 3
            stats = counters(client)
        assert stats["nvme_referenced_fills"] == (3 if label == "references" else 0)
        assert stats["nvme_bytes"] == sum(map(len, packs))  # the budget counts them alike
        file_bytes[label] = (catalog.cache_dir / "data.mdb").stat().st_blocks * 512
    # Copies take the packs' size on disk again; references a few pages of metas.
    assert file_bytes["copies"] >= sum(map(len, packs))
    assert file_bytes["references"] < 1 << 20


def test_a_mapped_file_outlives_its_collection(served: Served) -> None:
    pack = big_pack(2, seed=23)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/big", pack).revision
        data = client.fetch("acme/big")
        client.delete("acme/big@1")
        assert client.colocated is not None
        client.colocated.flush()
        client.gc()
        assert not blob_file(served, revision.digest).exists()
        assert bytes(data) == pack  # the engine's view of the unlinked file is intact


def test_a_flipped_byte_in_a_referenced_file_is_data_loss(served: Served) -> None:
    pack = big_pack(3, seed=24)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/big", pack).revision
        assert bytes(client.fetch("acme/big")) == pack
        blob = blob_file(served, revision.digest)
        raw = bytearray(blob.read_bytes())
        raw[(1 << 20) + 99] ^= 0xFF
        blob.write_bytes(bytes(raw))
        # The one copy is bad: refused on the colocated path and over the stream alike.
        with pytest.raises(DataLoss):
            client.fetch("acme/big")
        assert client.colocated is not None
        assert client.colocated.counters["corrupt_reported"] >= 1
    with CatalogClient(served.address, colocated=False) as stream, pytest.raises(DataLoss):
        stream.fetch("acme/big")


# -- when the tier cannot be read from here --------------------------------------------------


def test_a_catalog_in_this_process_is_read_over_the_stream(tmp_path: Path) -> None:
    pack = big_pack(2, seed=9)
    with running_catalog(tmp_path / "root") as running, running.client() as client:
        client.push("acme/big", pack)
        assert bytes(client.fetch("acme/big")) == pack
        assert client.colocated is not None
        assert "this process" in client.colocated.reason
        assert client.colocated.counters["reads"] == 0


def test_open_reader_refuses_what_it_cannot_trust(served: Served) -> None:
    with CatalogClient(served.address) as client:
        answer = client._stub.GetPackCacheLocation(pb.PackCacheLocationRequest())
    good = CacheLocation(answer.cache_dir, answer.instance_id, answer.host_id, answer.pid)
    assert Path(good.cache_dir) == served.cache_dir.resolve()
    open_reader(good).close()
    cases = {
        "runs on": good.__class__(good.cache_dir, good.instance_id, "elsewhere/boot", good.pid),
        "this process": good.__class__(good.cache_dir, good.instance_id, good.host_id, os.getpid()),
        "no NVMe tier environment": good.__class__(
            str(served.root / "nowhere"), good.instance_id, good.host_id, good.pid
        ),
        "not the catalog's": good.__class__(good.cache_dir, "0" * 32, good.host_id, good.pid),
        "without an NVMe tier": good.__class__("", "", good.host_id, good.pid),
    }
    for why, location in cases.items():
        with pytest.raises(NotColocated, match=why):
            open_reader(location)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_an_engine_without_access_to_the_lock_file_takes_the_stream() -> None:
    # A directory every user may traverse; the tier's lock.mdb stays writable by root only,
    # and LMDB readers must write their slot there.
    shared = Path(tempfile.mkdtemp(prefix="loracat-colocated-"))
    try:
        shared.chmod(0o755)
        pack = big_pack(2, seed=11)
        with serving(shared / "root", shared / "store") as served:
            with CatalogClient(served.address) as client:
                client.push("acme/big", pack)
            assert (served.cache_dir / "lock.mdb").stat().st_mode & 0o002 == 0
            engine = child("fetch-once", served.address, "acme/big", "nobody")
            result = finish(engine)
        assert result["good"] is True and result["reads"] == 0
        assert "cannot open the NVMe tier" in result["reason"], result
    finally:
        import shutil

        shutil.rmtree(shared, ignore_errors=True)


def test_the_digest_named_by_a_revision_is_what_is_read(served: Served) -> None:
    first, second = big_pack(2, seed=12), big_pack(2, seed=13)
    with CatalogClient(served.address) as client:
        one = client.push("acme/big", first).revision
        client.push("acme/big", second)
        # The alias moved on; a Revision still names its own bytes.
        assert Digest.of(client.fetch(one)) == one.digest
        assert bytes(client.fetch("acme/big")) == second


def test_gc_of_a_pack_an_engine_holds_a_lease_on(served: Served) -> None:
    pack = big_pack(2, seed=25)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/big", pack).revision
        client.push("acme/big", big_pack(2, seed=26))
        stub = client._stub
        with translated(client.target):
            lease = stub.LeasePack(pb.LeasePackRequest(ref=f"acme/big@{revision.digest}"))
        client.delete("acme/big@1")
        assert str(revision.digest) in client.gc()["deleted"]  # not refused by the lease
        assert not blob_file(served, revision.digest).exists()
        with translated(client.target):
            stub.ReleasePackLease(pb.ReleasePackLeaseRequest(lease_id=lease.lease_id))
        assert counters(client)["lease_active"] == 0
