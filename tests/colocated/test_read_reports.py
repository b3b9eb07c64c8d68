"""Unleased colocated reads, reported to the catalog in batches (``ReportPackReads``), against
a real `loracat serve` process and its real LMDB NVMe tier."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import grpc
import pytest

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.client import CatalogClient
from catalog.client.errors import translated
from catalog.errors import InvalidArgument
from catalog.pack_leasing import MAX_REPORTED_READS
from tests.colocated.conftest import Served, big_pack


def counters(client: CatalogClient) -> dict[str, int]:
    return dict(client.stats()["counters"])


class Reports:
    """A catalog stub that records every ``ReportPackReads`` the client sends; with
    ``unimplemented``, answers them as a catalog older than the RPC would."""

    def __init__(self, stub: Any, *, unimplemented: bool = False) -> None:
        self._stub = stub
        self._unimplemented = unimplemented
        self.ReportPackReads = self
        self.sent: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def future(self, request: Any, timeout: float | None = None) -> Any:
        self.sent.append(list(request.refs))
        if not self._unimplemented:
            return self._stub.ReportPackReads.future(request, timeout=timeout)
        answer: Future[Any] = Future()
        answer.set_exception(_Unimplemented())
        return answer


class _Unimplemented(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNIMPLEMENTED

    def details(self) -> str:
        return "Method not found!"


def test_unleased_reads_reach_the_catalog_in_one_report_after_the_delay(served: Served) -> None:
    pack = big_pack(2, seed=41)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/reported", pack).revision
        assert bytes(client.fetch("acme/reported")) == pack  # by reference: leased, filled
        path = client.colocated
        assert path is not None
        path.flush()
        reports = Reports(path._stub)
        path._stub = reports  # type: ignore[assignment]
        path.report_delay_s = 0.3
        before = counters(client)
        for _ in range(3):
            assert bytes(client.fetch(revision)) == pack
        assert path.counters["unleased_reads"] == 3
        # Nothing sent beside the reads; the timer sends all three at once.
        assert reports.sent == []
        deadline = time.monotonic() + 10
        while counters(client).get("pack_reads_reported", 0) < 3:
            assert time.monotonic() < deadline, reports.sent
            time.sleep(0.05)
        after = counters(client)
        assert reports.sent == [[f"acme/reported@{revision.digest}"] * 3]
        assert after["pack_leases"] == before["pack_leases"]  # no lease for these reads
        assert after["nvme_hits"] == before["nvme_hits"] + 3


def test_a_report_counts_the_packs_it_can_and_skips_the_rest(served: Served) -> None:
    pack = big_pack(1, seed=43)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/counted", pack).revision
        client.fetch("acme/counted")
        refs = [f"acme/counted@{revision.digest}", "acme/counted@2", "acme/missing@1"]
        with translated(client.target):
            answer = client._stub.ReportPackReads(pb.ReportPackReadsRequest(refs=refs), timeout=10)
        assert answer.recorded == 1
        assert counters(client)["pack_reads_ignored"] == 2
        too_many = [refs[0]] * (MAX_REPORTED_READS + 1)
        with pytest.raises(InvalidArgument, match="at most"), translated(client.target):
            client._stub.ReportPackReads(pb.ReportPackReadsRequest(refs=too_many), timeout=10)


def test_a_catalog_without_reports_is_asked_once(served: Served) -> None:
    pack = big_pack(1, seed=47)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/older", pack).revision
        client.fetch("acme/older")
        path = client.colocated
        assert path is not None
        reports = Reports(path._stub, unimplemented=True)
        path._stub = reports  # type: ignore[assignment]
        assert bytes(client.fetch(revision)) == pack
        path.flush()
        # Refused as unimplemented: later reads are served as before and not queued.
        assert bytes(client.fetch(revision)) == pack
        path.flush()
        assert reports.sent == [[f"acme/older@{revision.digest}"]]
        assert path.counters["unleased_reads"] == 2


def test_one_reporter_thread_sends_batch_after_batch_and_ends_with_the_client(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reports go out from one thread kept between batches (a thread started per batch
    cost every attach ~0.3 ms); it ends when idle for REPORTER_IDLE_S or on close."""
    from catalog.client import read_reports

    pack = big_pack(1, seed=53)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/threads", pack).revision
        client.fetch("acme/threads")
        path = client.colocated
        assert path is not None
        reports = Reports(path._stub)
        path._stub = reports  # type: ignore[assignment]
        path.report_delay_s = 0.05

        def read_and_wait_for_report(count: int) -> None:
            assert bytes(client.fetch(revision)) == pack
            deadline = time.monotonic() + 10
            while len(reports.sent) < count:
                assert time.monotonic() < deadline, reports.sent
                time.sleep(0.01)

        read_and_wait_for_report(1)
        thread = path.read_reports._thread
        assert thread is not None and thread.is_alive()
        read_and_wait_for_report(2)
        assert path.read_reports._thread is thread  # the same thread sent the second batch
        # Idle past REPORTER_IDLE_S: it ends, and the next read starts another.
        monkeypatch.setattr(read_reports, "REPORTER_IDLE_S", 0.05)
        with path.read_reports._wake:
            path.read_reports._wake.notify_all()
        read_and_wait_for_report(3)  # its wait from then on is the short one
        thread.join(10)
        assert not thread.is_alive() and path.read_reports._thread is None
        monkeypatch.setattr(read_reports, "REPORTER_IDLE_S", 60.0)
        read_and_wait_for_report(4)
        assert reports.sent[3] == [f"acme/threads@{revision.digest}"]
        last = path.read_reports._thread
        assert last is not None and last is not thread and last.is_alive()
    last.join(10)  # closing the client ends it
    assert not last.is_alive()
