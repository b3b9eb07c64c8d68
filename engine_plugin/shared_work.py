"""Work shared between the calling thread and one helper thread, without waiting on the helper.

A fetching attach on CPU has a few milliseconds of work that releases the GIL (torch copies that
transpose as they go, finite checks): on two cores it halves when a second thread takes part.
On a busy machine, though, the helper may not run for a while, and a fixed half handed to it
would make the attach wait for the scheduler. So the work is cut into small pieces that both
threads take from one queue; the caller waits only for pieces the helper has started, and
does everything itself when the helper never gets a core.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

__all__ = ["first_axis_spans", "run_shared"]


def run_shared(pieces: Sequence[Callable[[], None]], helper: Executor | None) -> None:
    """Run every piece once, on this thread and (when given) ``helper``; return when all are
    done. Raises the exception of the first failing piece (in ``pieces`` order); pieces after
    a failure may be skipped."""
    if helper is None or len(pieces) < 2:
        for piece in pieces:
            piece()
        return
    lock = threading.Lock()
    helper_idle = threading.Event()
    helper_idle.set()
    state = {"next": 0, "stop": False}
    failures: list[tuple[int, BaseException]] = []

    def take() -> int | None:
        with lock:
            index = state["next"]
            if state["stop"] or index >= len(pieces):
                return None
            state["next"] = index + 1
            return index

    def work(on_helper: bool) -> None:
        while True:
            if on_helper:
                with lock:  # claimed under the lock, so the caller sees it before it waits
                    if state["stop"] or state["next"] >= len(pieces):
                        return
                    helper_idle.clear()
            index = take()
            if index is None:
                if on_helper:
                    helper_idle.set()
                return
            try:
                pieces[index]()
            except BaseException as exc:
                with lock:
                    failures.append((index, exc))
                    state["stop"] = True
            finally:
                if on_helper:
                    helper_idle.set()

    helper.submit(work, True)
    work(False)
    helper_idle.wait()  # only a piece the helper started keeps us here
    if failures:
        raise min(failures, key=lambda f: f[0])[1]


def first_axis_spans(length: int, per_row: int, budget: int) -> list[tuple[int, int]]:
    """``[start, stop)`` spans over a first axis of ``length`` rows of ``per_row`` cost each,
    each span costing at most ``budget`` (at least one row)."""
    rows = max(1, budget // max(1, per_row))
    return [(start, min(length, start + rows)) for start in range(0, length, rows)]
