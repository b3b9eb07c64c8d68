"""The read-report batcher and the in-flight calls it shares with lease releases, on their own:
a recording sender beside the real ``loracat serve`` runs of ``test_read_reports`` (which
cannot reach ``REPORT_BATCH`` reads or a release still in flight at ``flush`` cheaply)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

from catalog.client.pending_calls import PendingCalls
from catalog.client.read_reports import REPORT_BATCH, ReadReports


class Sender:
    """Records each batch and answers it with a future the test ends."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.futures: list[Future[Any]] = []

    def __call__(self, refs: list[str]) -> Future[Any]:
        self.batches.append(list(refs))
        future: Future[Any] = Future()
        self.futures.append(future)
        return future


def test_a_full_batch_goes_out_on_the_reading_thread_without_waiting_for_the_delay() -> None:
    sender = Sender()
    reports = ReadReports(sender, PendingCalls(), "test")
    reports.delay_s = 60.0  # the reporter thread would wait a minute
    try:
        for index in range(REPORT_BATCH - 1):
            reports.add(f"acme/a@{index}")
        assert sender.batches == []
        reports.add("acme/a@last")
        assert len(sender.batches) == 1 and len(sender.batches[0]) == REPORT_BATCH
        assert sender.batches[0][-1] == "acme/a@last"
        reports.send()  # nothing left queued: nothing sent
        assert len(sender.batches) == 1
    finally:
        reports.close()


def test_wait_covers_every_call_in_flight_and_hands_failures_to_their_callback() -> None:
    pending = PendingCalls()
    failures: list[BaseException] = []
    slow: Future[Any] = Future()
    failing: Future[Any] = Future()
    cancelled: Future[Any] = Future()
    for future in (slow, failing, cancelled):
        pending.add(future, failures.append)
    cancelled.cancel()
    failing.set_exception(RuntimeError("refused"))
    threading.Timer(0.2, slow.set_result, args=(None,)).start()
    started = time.monotonic()
    pending.wait(timeout=10.0)
    assert slow.done() and time.monotonic() - started >= 0.15
    assert [str(error) for error in failures] == ["refused"]  # not the cancelled one
    never: Future[Any] = Future()
    pending.add(never, failures.append)
    started = time.monotonic()
    pending.wait(timeout=0.1)  # gives up at the timeout, raises nothing
    assert 0.05 <= time.monotonic() - started < 5.0 and not never.done()
