"""Unleased colocated reads, reported to the catalog in batches (``ReportPackReads``).

A colocated read of a revision the caller resolved already takes no lease (see
``catalog.client.colocated``), so the catalog would not see it: its eviction policy and hints
count reads. The reads are queued here and sent in one report per ``delay_s`` seconds (or per
``REPORT_BATCH`` reads), from one thread kept between batches, so no RPC runs beside the
attach that waits for the bytes. A catalog older than the RPC refuses it once and is not asked
again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from catalog.client.pending_calls import PendingCalls

__all__ = ["REPORTER_IDLE_S", "REPORT_BATCH", "REPORT_DELAY_S", "ReadReports"]

log = logging.getLogger(__name__)
#: Unleased reads are reported this many seconds after the first of a batch ...
REPORT_DELAY_S = 0.5
#: ... or as soon as this many are waiting (the catalog takes at most 1024 per report).
REPORT_BATCH = 256
#: The thread that sends them ends after this many seconds with nothing to send (the next
#: unleased read starts it again).
REPORTER_IDLE_S = 60.0


class ReadReports:
    """The queue of unleased reads not reported yet, and the thread that sends them.

    ``send`` sends one ``ReportPackReads`` of the refs given and returns its future (it may
    raise, e.g. on a closed channel: the batch is then logged and dropped); ``pending`` tracks
    the reports in flight for the owner's ``flush``; ``target`` names the catalog in logs.
    Thread safe.
    """

    def __init__(
        self, send: Callable[[list[str]], Any], pending: PendingCalls, target: str
    ) -> None:
        self._send = send
        self._pending = pending
        self._target = target
        self._lock = threading.Lock()
        #: Seconds a read waits to be reported with the reads after it.
        self.delay_s = REPORT_DELAY_S
        self._queued: list[str] = []
        self._first_queued = 0.0  # when the oldest queued read was queued (monotonic)
        # One thread sends the reports, kept between batches: starting a thread per batch
        # (a threading.Timer) cost an attach 0.3 ms (up to 3 ms) on the 2-core dev machine.
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._refused = False  # a catalog without ReportPackReads

    def add(self, ref: str) -> None:
        """Queue a read of ``ref`` for the next report (sent after ``delay_s``, at
        ``REPORT_BATCH`` reads, or by :meth:`send`)."""
        with self._lock:
            if self._refused:
                return
            if not self._queued:
                self._first_queued = time.monotonic()
            self._queued.append(ref)
            if len(self._queued) < REPORT_BATCH:
                if self._thread is None and not self._closing:
                    self._thread = threading.Thread(
                        target=self._loop, name="loracat-read-reports", daemon=True
                    )
                    self._thread.start()
                self._wake.notify()
                return
        self.send()

    def _loop(self) -> None:
        """The reporter thread: sends the queued reads once the oldest has waited
        ``delay_s``; ends after ``REPORTER_IDLE_S`` with none queued, or on close."""
        while True:
            with self._lock:
                idle_until = time.monotonic() + REPORTER_IDLE_S
                while not self._queued:
                    left = idle_until - time.monotonic()
                    if self._closing or left <= 0:
                        self._thread = None
                        return
                    self._wake.wait(left)
                while self._queued and not self._closing:
                    left = self._first_queued + self.delay_s - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
            self.send()

    def send(self) -> None:
        """Send the queued reads now (without waiting for the answer)."""
        with self._lock:
            batch, self._queued = self._queued, []
        if not batch:
            return
        try:
            future = self._send(batch)
        except Exception as exc:  # a closed channel, say: the reads stay uncounted
            log.warning(
                "catalog %s: reporting %d pack reads failed: %s", self._target, len(batch), exc
            )
            return
        self._pending.add(future, self._failed)  # so that flush and close wait for it too

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.UNIMPLEMENTED:
            # A catalog older than the report: its policy does not see unleased reads.
            with self._lock:
                self._refused = True
            log.info("catalog %s does not take pack read reports: %s", self._target, error)
            return
        log.warning("catalog %s: reporting pack reads failed: %s", self._target, error)

    def close(self) -> None:
        """End the reporter thread (after the owner's flush); later reads start none."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
