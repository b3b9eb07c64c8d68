"""Follow the catalog's hints: stage what it says is coming, attach what it says is serving.

A ``HintFollower`` runs one background thread per engine that iterates the catalog's hint stream
(`WatchHints`) and turns each hint into ``engine.prefetch`` (``stage``: fetch into host memory)
or ``engine.attach`` (``attach``: a deployment wave moved an alias such as ``serving``). Hints are
advice: a hint that fails (the adapter was deleted, every slot is busy) is counted and skipped,
and the stream is re-opened after a transient disconnect.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Protocol

from catalog.errors import (
    Cancelled,
    CatalogError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from catalog.model import Hint

log = logging.getLogger(__name__)


class HintSource(Protocol):
    def watch_hints(self, engine_id: str) -> Any:
        """An iterable of ``Hint`` with a ``cancel()`` method."""


class HintTarget(Protocol):
    engine_id: str

    def attach(self, ref: str) -> Any: ...

    def prefetch(self, refs: list[str]) -> Any: ...


class HintFollower:
    def __init__(self, engine: HintTarget, source: HintSource, *, reconnect_s: float = 1.0) -> None:
        self.engine = engine
        self.source = source
        self.reconnect_s = reconnect_s
        self.counters: Counter[str] = Counter()
        self.applied = threading.Condition()
        self._stop = threading.Event()
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name="loracat-hints", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._stream = self.source.watch_hints(self.engine.engine_id)
                for hint in self._stream:
                    self._apply(hint)
            except Cancelled:
                return
            except (NotFound, ResourceExhausted, Unauthenticated, PermissionDenied) as exc:
                # Unregistered, the server's cap on hint watchers is reached, or the token was
                # revoked or lacks the engine role (it may be restored): try again later.
                log.warning("hint stream refused: %s", exc)
                self.counters["refused"] += 1
            except Unavailable as exc:
                log.info("hint stream interrupted, reconnecting: %s", exc)
                self.counters["reconnects"] += 1
            self._stop.wait(self.reconnect_s)

    def _apply(self, hint: Hint) -> None:
        try:
            if hint.kind == "attach":
                self.engine.attach(hint.ref)
            elif hint.kind == "stage":
                self.engine.prefetch([hint.ref])
            else:
                self.counters["unknown"] += 1
                return
            self.counters[hint.kind] += 1
        except CatalogError as exc:
            log.info("hint %s %s skipped: %s", hint.kind, hint.ref, exc)
            self.counters["failed"] += 1
        with self.applied:
            self.applied.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until ``count`` hints were handled (tests, demos); False on timeout."""
        with self.applied:
            return self.applied.wait_for(
                lambda: sum(self.counters[k] for k in ("attach", "stage", "failed")) >= count,
                timeout,
            )

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.cancel()
        self._thread.join(timeout=10)
