"""Server-side prefetch: warm the NVMe tier for a set of references, by priority, before a deadline.

Requests from many callers share one priority queue and a few worker threads; each reference
reports its fate (``done``, ``failed``, ``cancelled``) to its request's progress queue, which the
gRPC layer streams back. A reference whose deadline passed before a worker reached it is
cancelled rather than fetched: late warm-up only competes with real traffic.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from catalog.errors import CatalogError, InvalidArgument
from catalog.model import PrefetchProgress

MAX_REFS_PER_REQUEST = 10_000


@dataclass(order=True)
class _Task:
    sort_key: tuple[int, float, int]
    ref: str = field(compare=False)
    deadline: float = field(compare=False)  # time.monotonic(); inf = none
    progress: queue.SimpleQueue[PrefetchProgress | None] = field(compare=False)
    remaining: list[int] = field(compare=False)  # shared countdown for the request
    lock: threading.Lock = field(compare=False)


#: ``warm(ref) -> (digest, size)``: resolve and bring the pack into the NVMe tier.
Warmer = Callable[[str], tuple[str, int]]


class PrefetchQueue:
    def __init__(self, warm: Warmer, *, workers: int = 4) -> None:
        self._warm = warm
        self._heap: list[_Task] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self.counters = {"queued": 0, "done": 0, "failed": 0, "cancelled": 0, "bytes": 0}
        self._threads = [
            threading.Thread(target=self._run, name=f"loracat-prefetch-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self, refs: list[str], *, priority: int = 0, deadline_s: float = 0.0
    ) -> Iterator[PrefetchProgress]:
        """Queue ``refs``; iterate the result for one progress record per reference.

        Higher ``priority`` runs first; ``deadline_s`` > 0 cancels what has not started within
        that many seconds. Raises ``InvalidArgument`` for an empty or oversized request.
        """
        if not refs:
            raise InvalidArgument("prefetch needs at least one reference")
        if len(refs) > MAX_REFS_PER_REQUEST:
            raise InvalidArgument(f"at most {MAX_REFS_PER_REQUEST} references per prefetch")
        if deadline_s < 0:
            raise InvalidArgument("deadline_s must be >= 0")
        progress: queue.SimpleQueue[PrefetchProgress | None] = queue.SimpleQueue()
        deadline = time.monotonic() + deadline_s if deadline_s else float("inf")
        remaining = [len(refs)]
        lock = threading.Lock()
        with self._cond:
            for ref in refs:
                task = _Task(
                    (-priority, deadline, next(self._seq)), ref, deadline, progress, remaining, lock
                )
                heapq.heappush(self._heap, task)
            self.counters["queued"] += len(refs)
            self._cond.notify(len(refs))
        return self._drain(progress)

    @staticmethod
    def _drain(progress: queue.SimpleQueue[PrefetchProgress | None]) -> Iterator[PrefetchProgress]:
        while (item := progress.get()) is not None:
            yield item

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                task = heapq.heappop(self._heap)
            self._finish(task, self._process(task))

    def _process(self, task: _Task) -> PrefetchProgress:
        if time.monotonic() > task.deadline:
            return PrefetchProgress(
                task.ref, "cancelled", error="deadline passed before it started"
            )
        try:
            digest, size = self._warm(task.ref)
        except CatalogError as exc:
            return PrefetchProgress(task.ref, "failed", error=f"{type(exc).__name__}: {exc}")
        return PrefetchProgress(task.ref, "done", digest=digest, size_bytes=size)

    def _finish(self, task: _Task, result: PrefetchProgress) -> None:
        with self._cond:
            self.counters[result.state] += 1
            self.counters["bytes"] += result.size_bytes
        task.progress.put(result)
        with task.lock:
            task.remaining[0] -= 1
            if task.remaining[0] == 0:
                task.progress.put(None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._heap = self._heap, []
            self._cond.notify_all()
        for task in pending:
            self._finish(
                task, PrefetchProgress(task.ref, "cancelled", error="server shutting down")
            )
