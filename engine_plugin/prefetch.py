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
from typing import Any

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

    ``snapshot`` returns ``(gpu_digests, host_digests, tier_counters)``; ``send`` delivers
    them. ``changed``
    only sets a flag (it is called on the attach path, under the engine's lock); one background
    thread waits ``debounce_s`` after the first change of a burst, then reports the state as it
    is by then. A failed report is retried with the next change.
    """

    def __init__(
        self,
        snapshot: Callable[[], tuple[list[str], list[str], list[dict[str, Any]]]],
        send: Callable[[list[str], list[str], list[dict[str, Any]]], None],
        *,
        debounce_s: float = 0.05,
    ) -> None:
        self._snapshot = snapshot
        self._send = send
        self._debounce_s = debounce_s
        self._cond = threading.Condition()
        self._dirty = False
        self._sending = False
        self._closed = False
        self.sent = 0
        self.failed = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="loracat-residency", daemon=True)
        self._thread.start()

    def changed(self) -> None:
        """Residency changed: make sure a report that reflects it goes out."""
        with self._cond:
            if not self._dirty:
                self._dirty = True
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._closed:
                    self._cond.wait()
                if not self._dirty:
                    return
                # Let the rest of a burst (a wave of attaches) land before looking.
                self._cond.wait_for(lambda: self._closed, timeout=self._debounce_s)
                self._dirty = False
                self._sending = True
            try:
                gpu, host, tiers = self._snapshot()
                self._send(gpu, host, tiers)
                self.sent += 1
            except Exception as exc:  # the next change retries; the engine keeps serving
                self.failed += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("residency report failed: %s", self.last_error)
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every change so far has been reported (or its report failed).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: not self._dirty and not self._sending, timeout):
                raise TimeoutError("residency report still pending")

    def close(self) -> None:
        """Send what is pending, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
