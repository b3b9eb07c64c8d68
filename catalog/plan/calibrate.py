"""``loracat plan calibrate``: measure what a load from each tier costs on this host.

For each reference (several sizes let the fit separate latency from rate), the median of
``repeats``:

* ``durable_read``: the catalog fetch right after ``EvictPack`` dropped the pack from the NVMe
  cache, so the server reads the durable store (S3, or the local directory) and streams it;
* ``nvme_read``: the same fetch again, now served from the NVMe cache;
* ``host_stage``: parsing and checking the pack (``read_pack``) plus one copy of its bytes, the
  torch-free part of what ``ResidentEngine`` does to stage it;
* ``device_load``: one more copy of the bytes, what filling a slot costs on a CPU engine. On a
  GPU host, measure the engine's ``time_s.copy_s`` per attach instead and edit the file: nothing
  under ``catalog/`` may import torch.

Each step is then fitted as ``latency + bytes / rate`` (``profile.fit_cost``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from catalog.atomic_files import write_atomically
from catalog.errors import FailedPrecondition, InvalidArgument, NotFound
from catalog.pack import read_pack
from catalog.plan.profile import STEPS, TierProfile, fit_cost


def _typical(repeats: int, action: Any) -> float:
    """The median of ``repeats`` timings: what a load typically costs (the minimum would be
    the best case, which the requests of a busy host do not see)."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return float(np.median(timings))


def calibrate(client: Any, refs: list[str], *, repeats: int = 3) -> TierProfile:
    """Time each step for ``refs`` through ``client`` (a ``CatalogClient``).

    Raises:
        InvalidArgument: no references.
        NotFound, InvalidReference: from the catalog.
        FailedPrecondition: the catalog has no NVMe cache (nothing to tell the tiers apart).
    """
    if not refs:
        raise InvalidArgument("calibrate needs at least one --ref")
    timings: dict[str, tuple[list[int], list[float]]] = {step: ([], []) for step in STEPS}

    def record(step: str, size: int, seconds: float) -> None:
        timings[step][0].append(size)
        timings[step][1].append(seconds)

    for ref in refs:
        revision = client.resolve(ref)
        size = int(revision.size_bytes)

        cold_timings = []
        for _ in range(repeats):
            try:
                client.evict_pack(ref)
            except NotFound:
                pass
            except FailedPrecondition as exc:
                raise FailedPrecondition(
                    f"the catalog cannot evict {ref} from its NVMe cache ({exc}); calibrate "
                    "needs a server with --cache-bytes > 0"
                ) from None
            started = time.perf_counter()
            client.fetch(revision)
            cold_timings.append(time.perf_counter() - started)
        cold = float(np.median(cold_timings))
        record("durable_read", size, cold)
        data = client.fetch(revision)
        record("nvme_read", size, _typical(repeats, lambda r=revision: client.fetch(r)))
        payload = bytes(data)
        record(
            "host_stage",
            size,
            _typical(repeats, lambda p=payload: (read_pack(p), bytearray(p))),
        )
        source = np.frombuffer(payload, dtype=np.uint8)
        target = np.empty_like(source)
        record("device_load", size, _typical(repeats, lambda t=target, s=source: np.copyto(t, s)))
    costs = {step: fit_cost(*timings[step]) for step in STEPS}
    return TierProfile(**costs, source=f"calibrated on {os.uname().nodename} with {len(refs)} refs")


def write_profile(profile: TierProfile, path: str | os.PathLike[str]) -> None:
    """Write ``profile`` as JSON (temporary name, then rename: never half-written).

    Raises:
        OSError: the file cannot be written (``path`` is left as it was).
    """
    text = json.dumps(profile.to_json(), indent=2, sort_keys=True) + "\n"
    # No fsync (none before either): a profile lost to a power cut is measured again.
    write_atomically(path, text, fsync=False)
