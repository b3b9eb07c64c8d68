"""Where each request is served from, for a configuration of the three tiers.

The tiers form the hierarchy a ``ResidentEngine`` and its catalog make:

* the GPU tier (``slots`` per engine) sees every request routed to its engine: a request whose
  adapter is in a slot is a hit, and a miss loads it, evicting the least recently used slot;
* the host tier (``bytes`` per engine) sees only that engine's GPU misses (a slot hit does not
  touch it): a hit copies the staged pack into a slot; a miss fetches it from the catalog and
  keeps it;
* the NVMe tier (``bytes``, the catalog's pack cache, shared by every engine) sees the host
  misses of all engines; what it lacks comes from the durable store (S3).

Every tier evicts least recently used first, as the engine's slot table and host tier do (and
the catalog's cache with ``--cache-policy lru``), so each tier's hits for every capacity come
from one stack-distance pass over the stream that reaches it (``catalog.plan.stack``). Requests
go to engines by adapter (``id mod engines``), the affinity routing that keeps an adapter on one
engine.

Limit: a byte capacity below the largest pack is modelled as if the oversized pack passed
through the cache and flushed it; the real tiers hand it through untouched. The default
capacities start at the largest pack; the curves (``curves.py``) replay the real LRU there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from catalog.errors import InvalidArgument
from catalog.plan.profile import TierProfile
from catalog.plan.stack import lru_needs, stack_distances
from catalog.plan.workload import Workload

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

#: Where a request can be served from, fastest first.
SERVED_FROM = ("gpu", "host", "nvme", "durable")


@dataclass(frozen=True, slots=True)
class Configuration:
    """GPU slots and host bytes per engine, NVMe bytes for the catalog."""

    gpu_slots: int
    host_bytes: int
    nvme_bytes: int

    def __post_init__(self) -> None:
        for name in ("gpu_slots", "host_bytes", "nvme_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Outcome:
    """One configuration over the workload: ``tier`` per request (index into ``SERVED_FROM``)
    and the load ``delay_s`` each request waited."""

    configuration: Configuration
    tier: npt.NDArray[np.int8]
    delay_s: FloatArray
    lookups: dict[str, int]
    hits: dict[str, int]

    def hit_rate(self, tier: str) -> float:
        """Hits over the requests that reached ``tier`` (0 when none did)."""
        return self.hits[tier] / self.lookups[tier] if self.lookups[tier] else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.delay_s, q)) * 1e3


class TierModel:
    """The LRU hierarchy over one workload, for any configuration (stack distances cached).

    Positions index the whole request sequence, warm-up included; outcomes count only the
    requests from ``start`` on (``Workload.warmup``).
    """

    def __init__(self, workload: Workload, *, engines: int, profile: TierProfile) -> None:
        if engines < 1:
            raise InvalidArgument(f"engines must be >= 1, got {engines}")
        self.workload = workload
        self.engines = engines
        self.sizes = workload.sizes
        self.ids = workload.ids
        self.engine_of = (workload.ids % engines).astype(np.int64)
        self.total = len(workload.ids)
        self.start = workload.warmup
        self._delays = profile.tier_delays(self.sizes)
        everyone = np.arange(self.total, dtype=np.int64)
        self._gpu_need = self._needs(everyone, unit="slots", per_engine=True)
        self._host_need: dict[int, tuple[IntArray, IntArray]] = {}
        self._nvme_need: dict[tuple[int, int], tuple[IntArray, IntArray]] = {}

    # --- streams ----------------------------------------------------------------------------

    def _needs(self, positions: IntArray, *, unit: str, per_engine: bool) -> IntArray:
        """The LRU capacity at which each request in ``positions`` hits, in that stream."""
        need = np.full(len(positions), -1, dtype=np.int64)
        groups = (
            [np.nonzero(self.engine_of[positions] == e)[0] for e in range(self.engines)]
            if per_engine and self.engines > 1
            else [np.arange(len(positions))]
        )
        for members in groups:
            if not len(members):
                continue
            chosen = positions[members]
            sizes = self.sizes[chosen]
            distances = stack_distances(self.ids[chosen], sizes)
            need[members] = lru_needs(distances, sizes, unit=unit)
        return need

    def gpu_stream(self) -> IntArray:
        """Every request (positions)."""
        return np.arange(self.total, dtype=np.int64)

    @property
    def gpu_needs(self) -> IntArray:
        """The GPU tier's LRU need of every request (see ``stack.lru_needs``)."""
        return self._gpu_need

    def gpu_hit_rate(self, slots: int) -> float:
        """GPU hits over the measured requests."""
        return float(self.gpu_hits(slots)[self.start :].mean())

    def gpu_hits(self, slots: int) -> BoolArray:
        need = self._gpu_need
        return (need >= 0) & (need <= slots)

    def host_stream(self, slots: int) -> tuple[IntArray, IntArray]:
        """Positions of the GPU misses at ``slots``, and their host-tier LRU needs."""
        cached = self._host_need.get(slots)
        if cached is None:
            positions = np.nonzero(~self.gpu_hits(slots))[0].astype(np.int64)
            cached = (positions, self._needs(positions, unit="bytes", per_engine=True))
            self._host_need[slots] = cached
        return cached

    def nvme_stream(self, slots: int, host_bytes: int) -> tuple[IntArray, IntArray]:
        """Positions of the host misses at ``(slots, host_bytes)``, and their NVMe needs."""
        key = (slots, host_bytes)
        cached = self._nvme_need.get(key)
        if cached is None:
            positions, need = self.host_stream(slots)
            missed = positions[~((need >= 0) & (need <= host_bytes))]
            cached = (missed, self._needs(missed, unit="bytes", per_engine=False))
            self._nvme_need[key] = cached
        return cached

    # --- one configuration ------------------------------------------------------------------

    def evaluate(self, configuration: Configuration) -> Outcome:
        """Where each request is served from under ``configuration``, and what it waits."""
        g, h, n = configuration.gpu_slots, configuration.host_bytes, configuration.nvme_bytes
        tier = np.zeros(self.total, dtype=np.int8)
        host_positions, _ = self.host_stream(g)
        tier[host_positions] = 1
        nvme_positions, nvme_need = self.nvme_stream(g, h)
        tier[nvme_positions] = 2
        durable = nvme_positions[~((nvme_need >= 0) & (nvme_need <= n))]
        tier[durable] = 3
        tier = tier[self.start :]
        delays = self._delays
        delay = np.zeros(len(tier), dtype=np.float64)
        for index, name in enumerate(SERVED_FROM[1:], start=1):
            chosen = tier == index
            delay[chosen] = delays[name][self.start :][chosen]
        reached = np.bincount(tier, minlength=len(SERVED_FROM))
        lookups = {
            "gpu": len(tier),
            "host": int(reached[1:].sum()),
            "nvme": int(reached[2:].sum()),
        }
        hits = {
            "gpu": int(reached[0]),
            "host": int(reached[1]),
            "nvme": int(reached[2]),
        }
        return Outcome(configuration, tier, delay, lookups, hits)
