"""``loracat plan``: tier sizing for a workload, as one JSON document behind the report.

The document (``build_plan``) is an object with

* ``requests``, ``adapters``, ``catalog_bytes``, ``inputs`` (everything the plan was asked, and
  the tier profile it used), ``engines`` (how many, and why);
* ``tiers``: ``gpu``, ``host`` and ``nvme``, each with ``unit`` (``slots`` or ``bytes``),
  ``stream`` (which requests reach it), ``requests``, ``capacities`` and ``curves``: a list of
  ``{"policy", "capacity", "hit_rate", "byte_hit_rate"}`` with fractions of the requests that
  reach the tier, Belady's reference under policy ``belady``;
* ``configurations``: the recommendation and the ``--compare`` ones, each with hit rates per
  tier, where requests were served from, load delay p50/p99/mean in ms and cost;
* ``recommendation``: ``met`` (bool), ``statement`` (one sentence a person reads), and
  ``configuration`` (the chosen one, or the closest when nothing met the targets).

The search (:func:`search`) walks GPU slots upwards from the smallest count meeting
``min_gpu_hit``; for each, every host capacity, and for each of those the smallest NVMe capacity
whose p99 delay meets the SLO (p99 only falls as NVMe grows: LRU's inclusion property). With
costs it returns the cheapest configuration met; without, the one with the fewest GPU slots,
then the least host memory, then the least NVMe (scarcest first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catalog.cache.policies import POLICIES, resolve_policy_name
from catalog.errors import InvalidArgument
from catalog.plan.curves import TierStream, tier_curves
from catalog.plan.profile import TierProfile
from catalog.plan.text import format_bytes
from catalog.plan.tiers import SERVED_FROM, Configuration, Outcome, TierModel
from catalog.plan.workload import Workload

TIERS = ("gpu", "host", "nvme")
UNITS = {"gpu": "slots", "host": "bytes", "nvme": "bytes"}
_GIB = 1 << 30
#: GPU slot counts tried above the first one that meets ``min_gpu_hit`` (with costs).
_GPU_CANDIDATES = 6


@dataclass(frozen=True)
class Costs:
    """Prices (any currency, any period) of one GPU slot, a GiB of host memory, a GiB of NVMe."""

    gpu_slot: float = 0.0
    host_gib: float = 0.0
    nvme_gib: float = 0.0

    def __post_init__(self) -> None:
        for name in ("gpu_slot", "host_gib", "nvme_gib"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"--cost-{name.replace('_', '-')} must be >= 0, got {value}")

    @property
    def given(self) -> bool:
        return bool(self.gpu_slot or self.host_gib or self.nvme_gib)

    def of(self, configuration: Configuration, engines: int) -> float:
        """Total price: slots and host memory on every engine, NVMe once."""
        return (
            engines
            * (
                configuration.gpu_slots * self.gpu_slot
                + configuration.host_bytes / _GIB * self.host_gib
            )
            + configuration.nvme_bytes / _GIB * self.nvme_gib
        )


@dataclass(frozen=True)
class PlanRequest:
    """What ``loracat plan`` was asked (see the CLI for each option's meaning)."""

    capacities: dict[str, list[int]] = field(default_factory=dict)
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    slo_p99_ms: float | None = None
    min_gpu_hit: float | None = None
    costs: Costs = Costs()
    rate: float | None = None
    rows_per_batch: int | None = None
    request_s: float = 1.0
    engines: int | None = None
    compare: list[Configuration] = field(default_factory=list)
    points: int = 20
    workers: int = 0
    warm: bool = True

    def __post_init__(self) -> None:
        for tier, values in self.capacities.items():
            if tier not in TIERS:
                raise InvalidArgument(
                    f"unknown tier {tier!r} in --capacities; tiers: gpu, host, nvme"
                )
            if not values:
                raise InvalidArgument(f"--capacities {tier}= names no capacity")
            for value in values:
                if type(value) is not int or value <= 0:
                    raise InvalidArgument(
                        f"--capacities {tier}: capacities must be positive, got {value}"
                    )
        if not self.policies:
            raise InvalidArgument("--policies names no policy")
        for name in self.policies:
            if resolve_policy_name(name) != name:
                raise InvalidArgument(f"--policies takes registry names, got {name!r}")
        if self.slo_p99_ms is not None and not (self.slo_p99_ms >= 0):
            raise InvalidArgument(f"--slo-p99-ms must be >= 0, got {self.slo_p99_ms}")
        if self.min_gpu_hit is not None and not 0 <= self.min_gpu_hit <= 1:
            raise InvalidArgument(f"--min-gpu-hit is a fraction in [0, 1], got {self.min_gpu_hit}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise InvalidArgument(f"--rate must be positive, got {self.rate}")
        if self.rows_per_batch is not None and self.rows_per_batch < 1:
            raise InvalidArgument(f"--rows-per-batch must be >= 1, got {self.rows_per_batch}")
        if not (self.request_s > 0 and math.isfinite(self.request_s)):
            raise InvalidArgument(f"--request-s must be positive, got {self.request_s}")
        if self.engines is not None and self.engines < 1:
            raise InvalidArgument(f"--engines must be >= 1, got {self.engines}")
        if self.points < 2:
            raise InvalidArgument(f"--points must be >= 2, got {self.points}")


def log_spaced(low: int, high: int, points: int) -> list[int]:
    """Up to ``points`` distinct integers from ``low`` to ``high``, log-spaced."""
    low, high = max(1, low), max(1, low, high)
    values = np.unique(np.round(np.geomspace(low, high, points)).astype(np.int64))
    return [int(v) for v in values]


def default_capacities(workload: Workload, engines: int, points: int) -> dict[str, list[int]]:
    """GPU: 1 slot up to every adapter an engine sees; host: the largest pack up to an engine's
    share of the catalog; NVMe: the largest pack up to the whole catalog."""
    largest = int(workload.key_sizes.max())
    per_engine = max(1, math.ceil(workload.adapters / engines))
    return {
        "gpu": log_spaced(1, per_engine, points),
        "host": log_spaced(largest, math.ceil(workload.catalog_bytes / engines), points),
        "nvme": log_spaced(largest, workload.catalog_bytes, points),
    }


def engines_needed(request: PlanRequest, workload: Workload) -> dict[str, Any]:
    """Engines for the rate (Little's law: rows busy = rate x seconds a request holds a row)."""
    rate = request.rate if request.rate is not None else workload.rate
    if request.engines is not None:
        return {"engines": request.engines, "rate": rate, "why": "given with --engines"}
    if rate is None or request.rows_per_batch is None:
        missing = " and ".join(
            name
            for name, value in (
                ("--rate (or a timed trace)", rate),
                ("--rows-per-batch", request.rows_per_batch),
            )
            if value is None
        )
        return {"engines": 1, "rate": rate, "why": f"one engine: give {missing} to size more"}
    busy = rate * request.request_s
    engines = max(1, math.ceil(busy / request.rows_per_batch))
    return {
        "engines": engines,
        "rate": rate,
        "rows_busy": busy,
        "why": (
            f"{rate:.4g} req/s x {request.request_s:g} s per request = {busy:.4g} rows busy, "
            f"{request.rows_per_batch} rows per batch"
        ),
    }


def describe(outcome: Outcome, costs: Costs, engines: int, label: str) -> dict[str, Any]:
    served = np.bincount(outcome.tier, minlength=len(SERVED_FROM)) / len(outcome.tier)
    c = outcome.configuration
    return {
        "label": label,
        "gpu_slots": c.gpu_slots,
        "host_bytes": c.host_bytes,
        "nvme_bytes": c.nvme_bytes,
        "hit_rate": {tier: outcome.hit_rate(tier) for tier in TIERS},
        "lookups": dict(outcome.lookups),
        "served_from": {
            tier: float(share) for tier, share in zip(SERVED_FROM, served, strict=True)
        },
        "delay_ms": {
            "p50": outcome.percentile_ms(50),
            "p99": outcome.percentile_ms(99),
            "mean": float(outcome.delay_s.mean()) * 1e3,
        },
        "cost": costs.of(c, engines) if costs.given else None,
    }


@dataclass
class SearchResult:
    met: Outcome | None
    closest: Outcome | None
    statement: str
    evaluated: int


def _p99_ms(outcome: Outcome) -> float:
    return outcome.percentile_ms(99)


def search(
    model: TierModel, capacities: dict[str, list[int]], request: PlanRequest
) -> SearchResult:
    """The configuration to recommend (see the module docstring).

    For each GPU slot count the largest host and NVMe capacities are tried first (if they do
    not meet the SLO, nothing smaller does); then binary searches find the smallest host
    capacity that can meet it with the largest NVMe, and the smallest NVMe for that host (p99
    falls as either grows: LRU's inclusion property). With costs, every host capacity from
    there up is tried too, each with its smallest NVMe.
    """
    slo = request.slo_p99_ms
    gpu_caps, host_caps, nvme_caps = (sorted(capacities[t]) for t in TIERS)
    gpu_ok = [
        g
        for g in gpu_caps
        if request.min_gpu_hit is None or model.gpu_hit_rate(g) >= request.min_gpu_hit
    ]
    evaluated = 0
    if not gpu_ok:
        largest = gpu_caps[-1]
        best = model.evaluate(Configuration(largest, host_caps[-1], nvme_caps[-1]))
        rate = best.hit_rate("gpu")
        return SearchResult(
            None,
            best,
            f"no GPU slot count up to {largest} reaches a GPU hit rate of "
            f"{request.min_gpu_hit:.1%}; the closest, {largest} slots, reaches {rate:.1%}",
            1,
        )
    if slo is None:
        chosen = model.evaluate(Configuration(gpu_ok[0], host_caps[0], nvme_caps[0]))
        return SearchResult(
            chosen,
            None,
            "no --slo-p99-ms given: the smallest configuration meeting the GPU hit target",
            1,
        )
    closest: Outcome | None = None

    def run(g: int, h: int, n: int) -> Outcome:
        nonlocal closest, evaluated
        outcome = model.evaluate(Configuration(g, h, n))
        evaluated += 1
        if closest is None or _p99_ms(outcome) < _p99_ms(closest):
            closest = outcome
        return outcome

    def smallest(values: list[int], meets: Any) -> int | None:
        """Index of the smallest value for which ``meets(value)``, assuming monotone."""
        low, high, found = 0, len(values) - 1, None
        while low <= high:
            middle = (low + high) // 2
            if meets(values[middle]):
                found, high = middle, middle - 1
            else:
                low = middle + 1
        return found

    best_met: Outcome | None = None
    best_key: tuple[float, ...] | None = None
    tried = 0
    for g in gpu_ok:
        if run(g, host_caps[-1], nvme_caps[-1]).percentile_ms(99) > slo:
            continue  # nothing smaller meets it at this slot count
        first_h = smallest(host_caps, lambda h, g=g: _p99_ms(run(g, h, nvme_caps[-1])) <= slo)
        assert first_h is not None
        for h in host_caps[first_h:] if request.costs.given else host_caps[first_h : first_h + 1]:
            index = smallest(nvme_caps, lambda n, g=g, h=h: _p99_ms(run(g, h, n)) <= slo)
            if index is None:
                continue
            found = run(g, h, nvme_caps[index])
            c = found.configuration
            key: tuple[float, ...] = (
                (request.costs.of(c, model.engines), c.gpu_slots, c.host_bytes, c.nvme_bytes)
                if request.costs.given
                else (c.gpu_slots, c.host_bytes, c.nvme_bytes)
            )
            if best_key is None or key < best_key:
                best_met, best_key = found, key
        tried += 1
        if not request.costs.given or tried >= _GPU_CANDIDATES:
            break  # fewest GPU slots first: a larger count cannot win without costs
    if best_met is not None:
        return SearchResult(best_met, None, "met", evaluated)
    assert closest is not None
    return SearchResult(
        None,
        closest,
        f"no configuration in the searched range meets p99 <= {slo:g} ms; the closest reaches "
        f"p99 {_p99_ms(closest):.3g} ms",
        evaluated,
    )


def _stream(model: TierModel, positions: np.ndarray, needs: np.ndarray, tier: str) -> TierStream:
    """The requests at ``positions`` (warm-up included) as one tier sees them."""
    shared = tier == "nvme" or model.engines == 1
    members = (
        [np.arange(len(positions))]
        if shared
        else [np.nonzero(model.engine_of[positions] == e)[0] for e in range(model.engines)]
    )
    measured = positions >= model.start
    groups, starts = [], []
    for chosen in members:
        if len(chosen):
            groups.append(model.ids[positions[chosen]])
            starts.append(int((~measured[chosen]).sum()))
    return TierStream(
        unit=UNITS[tier],
        keys=model.workload.keys,
        groups=groups,
        group_starts=starts,
        key_sizes=model.workload.key_sizes,
        needs=needs[measured],
        sizes=model.sizes[positions[measured]],
    )


def build_plan(workload: Workload, request: PlanRequest, profile: TierProfile) -> dict[str, Any]:
    """The whole plan for ``workload`` (see the module docstring).

    Raises:
        InvalidArgument: a bad request (see :class:`PlanRequest`).
    """
    if request.warm:
        workload = workload.warmed()
    sizing = engines_needed(request, workload)
    engines = int(sizing["engines"])
    capacities = default_capacities(workload, engines, request.points)
    capacities.update({t: sorted(set(v)) for t, v in request.capacities.items()})
    model = TierModel(workload, engines=engines, profile=profile)
    found = search(model, capacities, request)
    reference = found.met or found.closest
    assert reference is not None
    ref = reference.configuration
    gpu_positions = model.gpu_stream()
    host_positions, host_needs = model.host_stream(ref.gpu_slots)
    nvme_positions, nvme_needs = model.nvme_stream(ref.gpu_slots, ref.host_bytes)
    gpu_needs = model.gpu_needs
    streams = {
        "gpu": (_stream(model, gpu_positions, gpu_needs, "gpu"), "every request"),
        "host": (
            _stream(model, host_positions, host_needs, "host"),
            f"the GPU misses at {ref.gpu_slots} slots per engine",
        ),
        "nvme": (
            _stream(model, nvme_positions, nvme_needs, "nvme"),
            f"the host misses at {ref.gpu_slots} slots and {format_bytes(ref.host_bytes)} "
            "host memory per engine",
        ),
    }
    tiers: dict[str, Any] = {}
    for tier in TIERS:
        stream, described = streams[tier]
        tiers[tier] = {
            "unit": UNITS[tier],
            "stream": described,
            "requests": stream.requests,
            "capacities": capacities[tier],
            "curves": tier_curves(
                stream, request.policies, capacities[tier], workers=request.workers
            ),
        }
    configurations = [
        describe(reference, request.costs, engines, "recommended" if found.met else "closest")
    ]
    for index, configuration in enumerate(request.compare, start=1):
        configurations.append(
            describe(model.evaluate(configuration), request.costs, engines, f"compare {index}")
        )
    recommendation: dict[str, Any] = {
        "met": found.met is not None,
        "statement": (
            _met_statement(configurations[0], request)
            if found.statement == "met"
            else found.statement
        ),
        "configuration": configurations[0],
        "configurations_evaluated": found.evaluated,
    }
    return {
        "requests": workload.requests,
        "adapters": workload.adapters,
        "catalog_bytes": workload.catalog_bytes,
        "largest_pack_bytes": int(workload.key_sizes.max()),
        "duration_s": workload.duration_s,
        "inputs": {
            "source": workload.source,
            "policies": list(request.policies),
            "slo_p99_ms": request.slo_p99_ms,
            "min_gpu_hit": request.min_gpu_hit,
            "costs": vars(request.costs) if request.costs.given else None,
            "rate": request.rate,
            "rows_per_batch": request.rows_per_batch,
            "request_s": request.request_s,
            "warm_start": request.warm,
            "profile": profile.to_json(),
        },
        "engines": sizing,
        "tiers": tiers,
        "configurations": configurations,
        "recommendation": recommendation,
    }


def _met_statement(described: dict[str, Any], request: PlanRequest) -> str:
    parts = [
        f"{described['gpu_slots']} GPU slots and {format_bytes(described['host_bytes'])} host "
        f"memory per engine, {format_bytes(described['nvme_bytes'])} NVMe",
        f"p99 load delay {described['delay_ms']['p99']:.3g} ms",
        f"GPU hit rate {described['hit_rate']['gpu']:.1%}",
    ]
    if described["cost"] is not None:
        parts.append(f"cost {described['cost']:.4g}")
    return "; ".join(parts)


def parse_configuration(text: str, parse_bytes: Any) -> Configuration:
    """``SLOTS:HOST:NVME`` (bytes with K/M/G/T suffixes), e.g. ``16:8G:64G``.

    Raises:
        InvalidArgument: not three fields, or a field that is not a positive size.
    """
    fields = text.split(":")
    if len(fields) != 3:
        raise InvalidArgument(f"--compare takes SLOTS:HOST_BYTES:NVME_BYTES, got {text!r}")
    slots, host, nvme = fields
    if not slots.isdigit():
        raise InvalidArgument(f"--compare {text!r}: {slots!r} is not a slot count")
    return Configuration(int(slots), parse_bytes(host), parse_bytes(nvme))


def parse_capacities(entries: Sequence[str], parse_bytes: Any) -> dict[str, list[int]]:
    """``TIER=C1,C2,...`` entries (``gpu`` in slots, ``host``/``nvme`` in bytes with suffixes).

    Raises:
        InvalidArgument: an unknown tier, an empty list or a capacity that is not positive.
    """
    result: dict[str, list[int]] = {}
    for entry in entries:
        name, sep, values = entry.partition("=")
        tier = name.strip()
        if not sep or tier not in TIERS:
            raise InvalidArgument(
                f"--capacities takes TIER=C1,C2,... with TIER gpu, host or nvme, got {entry!r}"
            )
        parsed: list[int] = []
        for value in values.split(","):
            value = value.strip()
            if not value:
                continue
            if tier == "gpu":
                if not value.lstrip("-").isdigit():
                    raise InvalidArgument(f"--capacities gpu: {value!r} is not a slot count")
                parsed.append(int(value))
            else:
                if value.startswith("-"):
                    raise InvalidArgument(f"--capacities {tier}: {value!r} is negative")
                parsed.append(parse_bytes(value))
        for number in parsed:
            if number <= 0:
                raise InvalidArgument(
                    f"--capacities {tier}: capacities must be positive, got {number}"
                )
        result.setdefault(tier, []).extend(parsed)
    for tier, chosen in result.items():
        if not chosen:
            raise InvalidArgument(f"--capacities {tier}= names no capacity")
    return result
