"""Hints from the catalog to engines: what to stage or pre-attach next.

Two sources feed them. Deployment waves: when an alias named in ``attach_aliases`` (``serving``
by default) moves, every engine serving that base is told to attach the new target. Demand: the
catalog counts fetches per revision with exponential decay; periodically, the hottest revisions
that an engine does not already hold (by its residency reports) are sent to it as ``stage``
hints. Each engine has a bounded queue; when an engine falls behind, its oldest hints are dropped
(a hint is advice, never a command whose loss breaks anything).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator

from catalog.model import Hint

QUEUE_LIMIT = 1024


class _Subscription:
    def __init__(self, engine_id: str, base_id: str) -> None:
        self.engine_id = engine_id
        self.base_id = base_id
        self.queue: collections.deque[Hint] = collections.deque(maxlen=QUEUE_LIMIT)
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = 0


class HintBroker:
    """Fan-out of hints to subscribed engines, plus the decayed demand counter."""

    def __init__(self, *, half_life_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, list[_Subscription]] = {}
        self._demand: dict[tuple[str, str, str], float] = {}  # (ref, digest, base) -> score
        self._demand_at = time.monotonic()
        self._half_life = half_life_s
        self.sent = 0

    def subscribe(
        self, engine_id: str, base_id: str, *, stop: Callable[[], bool], poll_s: float = 0.5
    ) -> Iterator[Hint]:
        """Hints for one engine until ``stop()`` is true (checked every ``poll_s``)."""
        sub = _Subscription(engine_id, base_id)
        with self._lock:
            self._subs.setdefault(engine_id, []).append(sub)
        try:
            while not stop():
                with sub.cond:
                    if not sub.queue:
                        sub.cond.wait(poll_s)
                    batch = list(sub.queue)
                    sub.queue.clear()
                yield from batch
        finally:
            with self._lock:
                subs = self._subs.get(engine_id, [])
                if sub in subs:
                    subs.remove(sub)
                if not subs:
                    self._subs.pop(engine_id, None)

    def publish(self, hint: Hint, engine_ids: list[str] | None = None) -> int:
        """Send ``hint`` to the engines serving its base (or ``engine_ids``); returns how many."""
        with self._lock:
            targets = [
                sub
                for engine, subs in self._subs.items()
                if engine_ids is None or engine in engine_ids
                for sub in subs
                if not sub.base_id or not hint.base_id or sub.base_id == hint.base_id
            ]
        for sub in targets:
            with sub.cond:
                if len(sub.queue) == sub.queue.maxlen:
                    sub.dropped += 1
                sub.queue.append(hint)
                sub.cond.notify()
        with self._lock:
            self.sent += len(targets)
        return len(targets)

    def subscribers(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subs.values())

    # -- demand -------------------------------------------------------------------------------

    def record_demand(self, ref: str, digest: str, base_id: str, weight: float = 1.0) -> None:
        with self._lock:
            self._decay_locked()
            key = (ref, digest, base_id)
            self._demand[key] = self._demand.get(key, 0.0) + weight

    def hottest(self, count: int) -> list[tuple[str, str, str, float]]:
        """The ``count`` revisions with the most decayed demand: (ref, digest, base_id, score)."""
        with self._lock:
            self._decay_locked()
            ranked = sorted(self._demand.items(), key=lambda kv: kv[1], reverse=True)[:count]
        return [(ref, digest, base, score) for (ref, digest, base), score in ranked]

    def _decay_locked(self) -> None:
        now = time.monotonic()
        elapsed = now - self._demand_at
        if elapsed < 1.0:
            return
        factor = 0.5 ** (elapsed / self._half_life)
        self._demand = {k: v * factor for k, v in self._demand.items() if v * factor > 0.01}
        self._demand_at = now
