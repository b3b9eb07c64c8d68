"""Background work for the engine: staging packs ahead of need, reporting residency.

Both run on their own small thread pools so that neither a slow catalog nor a slow network ever
sits on the forward path. Fetch errors surface in the futures ``prefetch`` returns and in the
counters; a failed residency report is retried with the next change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from catalog.model import Revision

log = logging.getLogger(__name__)


@dataclass
class PrefetchCounters:
    submitted: int = 0
    completed: int = 0
    failed: int = 0


class Prefetcher:
    """Stages references in the host tier on background threads.

    ``stage`` resolves a reference, fetches its pack when it is not already staged and keeps it
    in host memory; it runs on one of ``workers`` threads. Requests for a reference already in
    flight share its future.
    """

    def __init__(self, stage: Callable[[str], Revision], *, workers: int = 2) -> None:
        self._stage = stage
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loracat-prefetch")
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[Revision]] = {}
        self.counters = PrefetchCounters()

    def submit(self, refs: Iterable[str]) -> list[Future[Revision]]:
        """Start staging ``refs``; one future per reference, resolving to its revision."""
        futures = []
        with self._lock:
            for ref in refs:
                future = self._in_flight.get(ref)
                if future is None:
                    future = self._pool.submit(self._run, ref)
                    self._in_flight[ref] = future
                    self.counters.submitted += 1
                futures.append(future)
        return futures

    def _run(self, ref: str) -> Revision:
        try:
            revision = self._stage(ref)
        except BaseException:
            with self._lock:
                self.counters.failed += 1
                self._in_flight.pop(ref, None)
            raise
        with self._lock:
            self.counters.completed += 1
            self._in_flight.pop(ref, None)
        return revision

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class ResidencyReporter:
    """Tells the catalog what the engine holds, coalescing bursts of changes into one report.

    ``snapshot`` returns ``(gpu_digests, host_digests)``; ``send`` delivers them. At most one
    report is in flight; changes while it runs trigger exactly one more.
    """

    def __init__(
        self,
        snapshot: Callable[[], tuple[list[str], list[str]]],
        send: Callable[[list[str], list[str]], None],
    ) -> None:
        self._snapshot = snapshot
        self._send = send
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loracat-residency")
        self._lock = threading.Lock()
        self._pending: Future[None] | None = None
        self._dirty = False
        self._running = False
        self.sent = 0
        self.failed = 0
        self.last_error: str | None = None

    def changed(self) -> None:
        """Residency changed: make sure a report that reflects it goes out."""
        with self._lock:
            self._dirty = True
            if not self._running:
                self._running = True
                self._pending = self._pool.submit(self._report)

    def _report(self) -> None:
        while True:
            with self._lock:
                if not self._dirty:
                    self._running = False
                    return
                self._dirty = False
            gpu, host = self._snapshot()
            try:
                self._send(gpu, host)
                self.sent += 1
            except Exception as exc:  # the next change retries; the engine keeps serving
                self.failed += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("residency report failed: %s", self.last_error)
                with self._lock:
                    self._running = False
                return

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the report in flight (tests, shutdown)."""
        with self._lock:
            pending = self._pending
        if pending is not None:
            pending.result(timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
