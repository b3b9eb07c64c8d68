"""RPCs a client sent off its caller's path and has not seen answered yet.

The colocated read path releases leases and reports unleased reads without waiting for the
answers (the bytes are the caller's already; an unreleased lease expires anyway), so that no
RPC runs beside the attach that waits for the bytes. ``flush`` and ``close`` must still be
able to wait for them: this set of futures is what they wait on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PendingCalls"]


class PendingCalls:
    """gRPC futures in flight, each forgotten when it ends. Thread safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[Any] = set()

    def add(self, future: Any, on_error: Callable[[BaseException], None]) -> None:
        """Track ``future`` until it ends; ``on_error`` gets its error, if it fails (not when
        it succeeds or is cancelled), on the thread that ends it."""
        with self._lock:
            self._calls.add(future)
        future.add_done_callback(lambda done: self._settled(done, on_error))

    def _settled(self, future: Any, on_error: Callable[[BaseException], None]) -> None:
        with self._lock:
            self._calls.discard(future)
        if future.cancelled():
            return
        error: BaseException | None = future.exception()
        if error is not None:
            on_error(error)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for every call in flight (those added meanwhile
        too) to end; their failures are ``on_error``'s, not raised here."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._calls)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return
            for future in pending:
                # A failure is logged by the callback; an unreleased lease expires anyway.
                with contextlib.suppress(Exception):
                    future.result(timeout=max(0.0, left))
            time.sleep(0.001)  # a callback may still be registering its release
