"""The tier profile: what moving one adapter from each tier costs, as ``latency + bytes / rate``.

A request whose adapter is not in a GPU slot waits for a load. Where the pack comes from decides
how long (this is the engine's path: ``ResidentEngine._load`` and ``_staged``):

==================  ==================================================================
served from         delay added to the request
==================  ==================================================================
GPU slot            0
host tier           ``device_load``
NVMe tier           ``nvme_read + host_stage + device_load``
durable (S3)        ``durable_read + host_stage + device_load``
==================  ==================================================================

``nvme_read`` and ``durable_read`` are a catalog fetch over gRPC served from the NVMe pack cache
or from the durable store; ``host_stage`` parses and stages the pack in host memory;
``device_load`` copies it into a slot (host to device, attach). ``loracat plan calibrate``
measures them on a host into a JSON file; :data:`DEFAULT_PROFILE` is used when none is given.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from catalog.errors import InvalidArgument

FloatArray = npt.NDArray[np.float64]

#: The steps of a load, in the order a pack travels.
STEPS = ("durable_read", "nvme_read", "host_stage", "device_load")


@dataclass(frozen=True, slots=True)
class TransferCost:
    """``latency_s + size / bytes_per_s`` seconds for a pack of ``size`` bytes."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, size: npt.ArrayLike) -> FloatArray:
        return self.latency_s + np.asarray(size, dtype=np.float64) / self.bytes_per_s


@dataclass(frozen=True, slots=True)
class TierProfile:
    """What each step of a load costs on one kind of host (see the module docstring)."""

    durable_read: TransferCost
    nvme_read: TransferCost
    host_stage: TransferCost
    device_load: TransferCost
    source: str = "defaults"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {step: asdict(getattr(self, step)) for step in STEPS}
        doc["source"] = self.source
        return doc

    @classmethod
    def from_json(cls, doc: Any, *, source: str) -> TierProfile:
        """Raises ``InvalidArgument`` naming the first missing or bad field."""
        if not isinstance(doc, dict):
            raise InvalidArgument(f"tier profile {source}: expected a JSON object")
        steps: dict[str, TransferCost] = {}
        for step in STEPS:
            entry = doc.get(step)
            if not isinstance(entry, dict):
                raise InvalidArgument(f"tier profile {source}: missing {step!r}")
            latency = entry.get("latency_s")
            rate = entry.get("bytes_per_s")
            if not isinstance(latency, int | float) or not _finite(latency) or latency < 0:
                raise InvalidArgument(
                    f"tier profile {source}: {step}.latency_s must be >= 0, got {latency!r}"
                )
            if not isinstance(rate, int | float) or not _finite(rate) or rate <= 0:
                raise InvalidArgument(
                    f"tier profile {source}: {step}.bytes_per_s must be > 0, got {rate!r}"
                )
            steps[step] = TransferCost(float(latency), float(rate))
        return cls(**steps, source=str(doc.get("source", source)))

    def tier_delays(self, sizes: npt.ArrayLike) -> dict[str, FloatArray]:
        """Seconds a load from each tier adds, per size (keys ``gpu host nvme durable``)."""
        device = self.device_load.seconds(sizes)
        staged = device + self.host_stage.seconds(sizes)
        return {
            "gpu": np.zeros_like(device),
            "host": device,
            "nvme": staged + self.nvme_read.seconds(sizes),
            "durable": staged + self.durable_read.seconds(sizes),
        }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_MB = 1e6

#: Documented defaults: a GPU node (PCIe 4 x16) beside a catalog on local NVMe, with S3 in the
#: same region. S3: ~30 ms to first byte, ~100 MB/s for one stream; the catalog's fetch from its
#: NVMe cache over gRPC: ~1 ms and ~600 MB/s (the gRPC stream ceiling measured here, see
#: docs/PERFORMANCE.md); staging (parse, check, lay out in pinned memory): ~0.2 ms, 2 GB/s;
#: host to device plus attach: ~0.3 ms (launch and sync), 20 GB/s pinned.
DEFAULT_PROFILE = TierProfile(
    durable_read=TransferCost(0.030, 100 * _MB),
    nvme_read=TransferCost(0.001, 600 * _MB),
    host_stage=TransferCost(0.0002, 2000 * _MB),
    device_load=TransferCost(0.0003, 20000 * _MB),
)


def load_profile(path: str | os.PathLike[str] | None) -> TierProfile:
    """The profile in ``path`` (as written by ``loracat plan calibrate``), or the defaults.

    Raises:
        InvalidArgument: unreadable file, not JSON, or a missing or bad field.
    """
    if path is None:
        return DEFAULT_PROFILE
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            doc = json.load(handle)
    except OSError as exc:
        raise InvalidArgument(f"cannot read tier profile {source}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"tier profile {source} is not JSON: {exc}") from None
    return TierProfile.from_json(doc, source=source)


def fit_cost(sizes: list[int], seconds: list[float]) -> TransferCost:
    """``latency + size / rate`` through measured ``(size, seconds)`` points.

    The timings of each distinct size are averaged first, then a line is fitted through the
    means (means, not medians: a plan's mean delay is a sum of loads, stalls included). With
    one distinct size, or a line that comes out non-physical (negative latency or rate), the
    latency is taken as 0 and the rate as the mean time's bytes per second.

    Raises:
        InvalidArgument: no points, or lengths that differ.
    """
    if not sizes or len(sizes) != len(seconds):
        raise InvalidArgument("fit_cost needs as many sizes as timings, at least one")
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    distinct = np.unique(x)
    means = np.array([y[x == size].mean() for size in distinct])
    if len(distinct) > 1:
        slope, intercept = np.polyfit(distinct, means, 1)
        if slope > 0 and intercept >= 0:
            return TransferCost(float(intercept), float(1.0 / slope))
    return TransferCost(0.0, float(x.sum() / max(y.sum(), 1e-9)))
