"""Engines known to the catalog: registration, residency reports and their hint streams.

Mixed into ``catalog.core.Catalog``. Engine records live in memory only: an engine registers
again when it (or the catalog) restarts.

Records are bounded, because any engine-role caller can make them: each principal may hold
``Limits.max_engines_per_principal`` engine ids (an id belongs to the principal that registered
it until it expires), a record expires ``Limits.engine_ttl_s`` after the engine last registered
or reported while no hint stream of it is open, and a report names at most
``Limits.max_reported_digests`` digests per tier.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog.digest import Digest
from catalog.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from catalog.hints import HintBroker
from catalog.identity import caller
from catalog.model import Hint
from catalog.push_upload import Limits


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
    #: Who registered it ("" when anonymous); only that principal may report for it.
    principal: str = ""
    #: When it last registered or reported (monotonic clock): the TTL counts from here.
    last_seen: float = field(default_factory=time.monotonic)
    #: Hint streams open for it: an engine that watches is alive even when it is quiet.
    watchers: int = 0


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
    limits: Limits
    _engines: dict[str, EngineRecord]
    _engines_lock: threading.Lock

    def register_engine(
        self, engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int
    ) -> None:
        """Record an engine (re-registering replaces its record) for the calling principal.

        Raises ``InvalidArgument`` (a bad id), ``PermissionDenied`` (the id is another
        principal's), ``ResourceExhausted`` (the principal holds its maximum of engines).
        """
        if not engine_id or len(engine_id) > 128:
            raise InvalidArgument("engine_id must be 1-128 characters")
        owner = caller()
        with self._engines_lock:
            self._expire_engines_locked()
            existing = self._engines.get(engine_id)
            if existing is not None and existing.principal != owner:
                raise PermissionDenied(f"engine id {engine_id!r} is another principal's")
            held = sum(1 for r in self._engines.values() if r.principal == owner)
            if existing is None and held >= self.limits.max_engines_per_principal:
                raise ResourceExhausted(
                    f"{owner or 'anonymous'} already has {held} engines registered (the limit); "
                    f"reuse an engine id, or wait {self.limits.engine_ttl_s:.0f} s for idle ones "
                    "to expire"
                )
            self._engines[engine_id] = EngineRecord(
                engine_id,
                base_id,
                num_slots,
                max_rank,
                host_bytes,
                principal=owner,
                last_seen=time.monotonic(),
            )

    def _expire_engines_locked(self) -> None:
        horizon = time.monotonic() - self.limits.engine_ttl_s
        for engine_id in [
            e.engine_id for e in self._engines.values() if e.last_seen < horizon and e.watchers == 0
        ]:
            del self._engines[engine_id]

    def _own_engine_locked(self, engine_id: str) -> EngineRecord:
        record = self._engines.get(engine_id)
        if record is None:
            raise NotFound(f"engine {engine_id[:128]!r} is not registered")
        if record.principal != caller():
            # the same answer as for an unknown id: another principal's engines are not shown
            raise NotFound(f"engine {engine_id[:128]!r} is not registered")
        return record

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
        self.check_report_size(len(gpu), len(host))
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
            self._expire_engines_locked()
            record = self._own_engine_locked(engine_id)
            record.gpu = frozenset(gpu)
            record.host = frozenset(host)
            if tiers:
                record.tiers = reported
            record.last_report = time.time()
            record.last_seen = time.monotonic()

    def check_report_size(self, gpu: int, host: int) -> None:
        """Raise ``InvalidArgument`` when a residency report names more digests per tier than
        ``Limits.max_reported_digests``."""
        limit = self.limits.max_reported_digests
        for tier_name, count in (("gpu", gpu), ("host", host)):
            if count > limit:
                raise InvalidArgument(
                    f"a residency report names {count} {tier_name} digests; at most "
                    f"{limit} per tier"
                )

    def engines(self) -> list[EngineRecord]:
        """The engines not expired (see the module docstring)."""
        with self._engines_lock:
            self._expire_engines_locked()
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
        """The hint stream of a registered engine of the caller, until ``stop()``; the engine
        does not expire while it is open. Raises ``NotFound``."""
        with self._engines_lock:
            self._expire_engines_locked()
            record = self._own_engine_locked(engine_id)
        return self._watching(record, self.hints.subscribe(engine_id, record.base_id, stop=stop))

    def _watching(self, record: EngineRecord, stream: Iterator[Hint]) -> Iterator[Hint]:
        # counted once the stream runs, so a stream never started cannot keep a record alive
        with self._engines_lock:
            record.watchers += 1
        try:
            yield from stream
        finally:
            with self._engines_lock:
                record.watchers -= 1
                record.last_seen = time.monotonic()
