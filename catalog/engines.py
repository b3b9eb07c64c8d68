"""Engines known to the catalog: registration, residency reports and their hint streams.

Mixed into ``catalog.core.Catalog``. Engine records live in memory only: an engine registers
again when it (or the catalog) restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog.digest import Digest
from catalog.errors import InvalidArgument, NotFound
from catalog.hints import HintBroker
from catalog.model import Hint


@dataclass
class EngineRecord:
    """What an engine told the catalog about itself and its residency."""

    engine_id: str
    base_id: str
    num_slots: int
    max_rank: int
    host_bytes: int
    gpu: frozenset[str] = frozenset()
    host: frozenset[str] = frozenset()
    registered_at: float = field(default_factory=time.time)
    last_report: float = 0.0
    #: The engine's own counters per tier it holds ("host", "gpu"): ENGINE_TIER_FIELDS.
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)


#: What an engine may report about each of its tiers; the catalog sums them across engines.
ENGINE_TIERS = ("host", "gpu")
ENGINE_TIER_FIELDS = (
    "bytes",
    "entries",
    "hits",
    "misses",
    "evictions",
    "capacity_bytes",
    "bytes_in",
    "bytes_out",
)


class EngineRegistry:
    """The engine methods of :class:`catalog.core.Catalog`."""

    hints: HintBroker
    _engines: dict[str, EngineRecord]
    _engines_lock: threading.Lock

    def register_engine(
        self, engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int
    ) -> None:
        """Record an engine (re-registering replaces its record). Raises ``InvalidArgument``."""
        if not engine_id or len(engine_id) > 128:
            raise InvalidArgument("engine_id must be 1-128 characters")
        with self._engines_lock:
            self._engines[engine_id] = EngineRecord(
                engine_id, base_id, num_slots, max_rank, host_bytes
            )

    def report_residency(
        self,
        engine_id: str,
        gpu: list[str],
        host: list[str],
        tiers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Replace what an engine holds in GPU slots and host memory, and (optionally) its
        counters for those tiers: each a mapping with ``tier`` ("host" or "gpu") and any of
        ``ENGINE_TIER_FIELDS``, as non-negative integers.

        Raises:
            NotFound: the engine is not registered.
            InvalidArgument: a digest is malformed, or a tier or counter is unknown or negative.
        """
        for text in (*gpu, *host):
            Digest.parse(text)
        reported = {}
        for tier in tiers:
            name = tier.get("tier")
            if name not in ENGINE_TIERS:
                raise InvalidArgument(
                    f"engine tier must be one of {', '.join(ENGINE_TIERS)}, got {name!r}"
                )
            values = {k: v for k, v in tier.items() if k != "tier"}
            unknown = sorted(set(values) - set(ENGINE_TIER_FIELDS))
            if unknown:
                raise InvalidArgument(f"unknown {name} tier counters: {', '.join(unknown)}")
            bad = sorted(k for k, v in values.items() if not isinstance(v, int) or v < 0)
            if bad:
                raise InvalidArgument(
                    f"{name} tier counters must be non-negative integers: {', '.join(bad)}"
                )
            reported[name] = {k: int(v) for k, v in values.items()}
        with self._engines_lock:
            record = self._engines.get(engine_id)
            if record is None:
                raise NotFound(f"engine {engine_id!r} is not registered")
            record.gpu = frozenset(gpu)
            record.host = frozenset(host)
            if tiers:
                record.tiers = reported
            record.last_report = time.time()

    def engines(self) -> list[EngineRecord]:
        with self._engines_lock:
            return list(self._engines.values())

    def publish_demand_hints(self, count: int = 16) -> int:
        """Tell each engine to stage the hottest revisions it does not hold; returns hints sent."""
        sent = 0
        hottest = self.hints.hottest(count)
        for engine in self.engines():
            held = engine.gpu | engine.host
            for ref, digest, base_id, score in hottest:
                if digest in held or (engine.base_id and base_id and engine.base_id != base_id):
                    continue
                sent += self.hints.publish(
                    Hint("stage", ref, digest, base_id, f"demand {score:.1f}", time.time()),
                    engine_ids=[engine.engine_id],
                )
        return sent

    def watch_hints(self, engine_id: str, stop: Callable[[], bool]) -> Iterator[Hint]:
        """The hint stream of a registered engine, until ``stop()``. Raises ``NotFound``."""
        with self._engines_lock:
            record = self._engines.get(engine_id)
        if record is None:
            raise NotFound(f"engine {engine_id!r} is not registered")
        return self.hints.subscribe(engine_id, record.base_id, stop=stop)
