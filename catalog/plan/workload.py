"""What a plan is computed for: a request stream over adapters of known sizes.

A trace holds one request per line, ``REF SIZE_BYTES [TIMESTAMP_S]`` (the ``loracat cache
simulate`` format plus an optional time in seconds)::

    # comments and blank lines are ignored
    acme/support-bot@3 13639680 1733300000.125
    acme/support-bot@serving 13639680 1733300000.250

Either every request carries a time or none does, and times never go backwards. The key is the
reference as the line spells it; one key names one immutable pack, so it always has one size.
Reading is all-or-nothing: the first bad line raises ``InvalidArgument`` naming its number.

The synthetic workload (:func:`synthetic_workload`) draws its adapters from
``catalog.cache.traces.synthetic_catalog`` (packs of a 1B-class base, bf16, 16 layers: ranks
8/16/32/64 with weights 30/35/25/10%, 30% also targeting the MLP, so 3 to 86 MiB), requests with
Zipf(s) popularity in random order, Poisson arrivals at ``rate``, and a fresh popularity order
every ``shift_every`` seconds (the hot set moves, as when tenants come and go).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from catalog.cache.traces import synthetic_catalog
from catalog.errors import InvalidArgument
from catalog.model import Ref

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Workload:
    """Requests as integer key ids into ``keys`` (first appearance order) with their sizes.

    ``times`` (seconds, non-decreasing) is None when the source had none. The first
    ``warmup`` requests only fill the tiers; every figure counts the requests after them.
    """

    keys: list[str]
    key_sizes: IntArray
    ids: IntArray
    times: FloatArray | None
    source: str
    warmup: int = 0

    @property
    def requests(self) -> int:
        """Measured requests (warm-up excluded)."""
        return len(self.ids) - self.warmup

    @property
    def adapters(self) -> int:
        return len(self.keys)

    @property
    def sizes(self) -> IntArray:
        """The size of each request's pack (warm-up included)."""
        return self.key_sizes[self.ids]

    @property
    def catalog_bytes(self) -> int:
        return int(self.key_sizes.sum())

    def warmed(self) -> Workload:
        """This workload after a warm-up that requests every adapter once, the first-seen
        last: the tiers start holding what the trace asks for first, as a catalog and engines
        that have been serving do (a trace is a window of a longer run). Without it every
        adapter's first request is a miss in every tier, and with 10^5 adapters in 10^6
        requests that alone puts a durable read at the p99."""
        if self.warmup:
            return self
        prefix = np.arange(self.adapters - 1, -1, -1, dtype=np.int64)
        return Workload(
            keys=self.keys,
            key_sizes=self.key_sizes,
            ids=np.concatenate([prefix, self.ids]),
            times=self.times,
            source=self.source,
            warmup=len(prefix),
        )

    @property
    def duration_s(self) -> float | None:
        if self.times is None or len(self.times) < 2:
            return None
        return float(self.times[-1] - self.times[0])

    @property
    def rate(self) -> float | None:
        """Requests per second over the trace's span, when it has times."""
        span = self.duration_s
        return self.requests / span if span else None

    def request_keys(self) -> list[str]:
        """The key of every measured request (shared string objects, cheap to hash)."""
        keys = self.keys
        return [keys[i] for i in self.ids[self.warmup :].tolist()]


def parse_trace(lines: Iterable[str], *, source: str = "<lines>") -> Workload:
    """Parse trace lines (see the module docstring).

    Raises:
        InvalidArgument: a malformed line (bad field count, reference, size or time), a time on
            some lines only, a time going backwards, a key seen with two sizes, or no requests at
            all. The message names the line number.
    """
    index: dict[str, int] = {}
    key_sizes: list[int] = []
    first_line: list[int] = []
    ids: list[int] = []
    times: list[float] = []
    timed: bool | None = None
    last_time = -math.inf
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"trace {source} line {number}"
        fields = line.split()
        if len(fields) not in (2, 3):
            raise InvalidArgument(
                f"{where}: expected 'REF SIZE_BYTES [TIMESTAMP_S]', got {line[:120]!r}"
            )
        text, size_text = fields[0], fields[1]
        if not (size_text.isascii() and size_text.isdigit()) or int(size_text) <= 0:
            raise InvalidArgument(
                f"{where}: size {size_text[:40]!r} is not a positive integer number of bytes"
            )
        size = int(size_text)
        has_time = len(fields) == 3
        if timed is None:
            timed = has_time
        elif timed != has_time:
            raise InvalidArgument(
                f"{where}: {'a' if has_time else 'no'} timestamp, but the first request had "
                f"{'none' if has_time else 'one'}; give every request a time or none"
            )
        if has_time:
            try:
                stamp = float(fields[2])
            except ValueError:
                stamp = math.nan
            if not math.isfinite(stamp):
                raise InvalidArgument(f"{where}: timestamp {fields[2][:40]!r} is not a number")
            if stamp < last_time:
                raise InvalidArgument(
                    f"{where}: timestamp {stamp} is earlier than the line before ({last_time})"
                )
            last_time = stamp
            times.append(stamp)
        key = index.get(text)
        if key is None:
            try:
                Ref.parse(text)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: {exc}") from None
            key = index[text] = len(key_sizes)
            key_sizes.append(size)
            first_line.append(number)
        elif key_sizes[key] != size:
            raise InvalidArgument(
                f"{where}: {text} has size {size} but line {first_line[key]} gave "
                f"{key_sizes[key]}; a key names one immutable pack"
            )
        ids.append(key)
    if not ids:
        raise InvalidArgument(f"trace {source} has no requests")
    return Workload(
        keys=list(index),
        key_sizes=np.asarray(key_sizes, dtype=np.int64),
        ids=np.asarray(ids, dtype=np.int64),
        times=np.asarray(times, dtype=np.float64) if timed else None,
        source=source,
    )


def read_trace(path: str | os.PathLike[str]) -> Workload:
    """Read a trace file, or standard input when ``path`` is ``"-"``.

    Raises:
        InvalidArgument: the file cannot be read or is not UTF-8, or see :func:`parse_trace`.
    """
    source = os.fspath(path)
    if source == "-":
        return parse_trace(sys.stdin, source="<stdin>")
    try:
        with open(source, encoding="utf-8") as handle:
            return parse_trace(handle, source=source)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"trace {source} is not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read trace {source}: {exc.strerror or exc}") from None


def format_trace_line(ref: str, size: int, timestamp: float | None) -> str:
    """One trace line (no newline)."""
    return f"{ref} {size}" if timestamp is None else f"{ref} {size} {timestamp:.6f}"


def synthetic_workload(
    *,
    adapters: int,
    zipf: float,
    rate: float,
    duration_s: float,
    shift_every_s: float | None = None,
    seed: int = 0,
) -> Workload:
    """``rate x duration_s`` requests over ``adapters`` synthetic adapters (module docstring).

    Raises:
        InvalidArgument: a non-positive count, rate, duration or shift period, a negative
            ``zipf``, or fewer than one request in all.
    """
    if adapters <= 0:
        raise InvalidArgument(f"--adapters must be positive, got {adapters}")
    if zipf < 0 or not math.isfinite(zipf):
        raise InvalidArgument(f"--zipf must be >= 0, got {zipf}")
    if rate <= 0 or duration_s <= 0 or not math.isfinite(rate * duration_s):
        raise InvalidArgument(f"--rate and --duration must be positive, got {rate}, {duration_s}")
    if shift_every_s is not None and shift_every_s <= 0:
        raise InvalidArgument(f"--shift-every must be positive, got {shift_every_s}")
    count = round(rate * duration_s)
    if count < 1:
        raise InvalidArgument(f"rate x duration gives {rate * duration_s:.3f} requests")
    catalog = synthetic_catalog(adapters, seed=seed)
    rng = np.random.default_rng(seed + 1)
    times = np.cumsum(rng.exponential(1.0 / rate, size=count))
    weights = np.arange(1, adapters + 1, dtype=np.float64) ** -zipf
    cumulative = np.cumsum(weights)
    cumulative /= cumulative[-1]
    ranks = np.minimum(np.searchsorted(cumulative, rng.random(count), side="right"), adapters - 1)
    phase = (
        np.zeros(count, dtype=np.int64)
        if shift_every_s is None
        else (times // shift_every_s).astype(np.int64)
    )
    chosen = np.empty(count, dtype=np.int64)
    for value in np.unique(phase).tolist():
        members = phase == value
        chosen[members] = rng.permutation(adapters)[ranks[members]]
    # Ids in order of first appearance, as a parsed trace numbers them.
    _, first = np.unique(chosen, return_index=True)
    seen = np.sort(first)
    renumber = np.full(adapters, -1, dtype=np.int64)
    renumber[chosen[seen]] = np.arange(len(seen), dtype=np.int64)
    keys = [catalog[i][0] for i in chosen[seen].tolist()]
    key_sizes = np.asarray([catalog[i][1] for i in chosen[seen].tolist()], dtype=np.int64)
    shift = f", popularity reshuffled every {shift_every_s:g} s" if shift_every_s else ""
    return Workload(
        keys=keys,
        key_sizes=key_sizes,
        ids=renumber[chosen],
        times=times - times[0],
        source=(
            f"synthetic: {adapters} adapters, Zipf s={zipf:g}, {rate:g} req/s for "
            f"{duration_s:g} s{shift}, seed {seed}"
        ),
    )
