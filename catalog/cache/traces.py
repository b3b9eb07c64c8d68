"""Request traces for the cache simulator: the file format and synthetic workloads.

A trace file holds one request per line, ``tenant/name@rev SIZE_BYTES``::

    # comments and blank lines are ignored
    acme/support-bot@3 13639680
    acme/support-bot@serving 13639680

The key is the reference exactly as the line spells it (one key = one immutable pack, so a key
always has the same size). Reading is all-or-nothing: the first bad line raises
:class:`~catalog.errors.InvalidArgument` naming its line number.

The generators model LoRA packs for a 1B-class base (hidden 2048, 16 layers, bf16): ranks 8 to
64, attention-only or attention+MLP targets, i.e. 3 MiB to 86 MiB per pack. Popularity is
independent of size. Every generator is deterministic for a given seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from catalog.atomic_files import open_atomically
from catalog.errors import InvalidArgument
from catalog.model import Ref

#: One request: the cache key (a reference string) and the pack's size in bytes.
Request = tuple[str, int]

#: LoRA parameters per rank per layer for q, k, v, o of a hidden-2048 / kv-512 base.
_ATTENTION_PARAMS_PER_RANK = 2 * (2048 + 2048) + 2 * (2048 + 512)
#: ... and for gate, up, down with an intermediate size of 8192.
_MLP_PARAMS_PER_RANK = 3 * (2048 + 8192)
_LAYERS = 16
_BYTES_PER_PARAM = 2  # bf16
_PACK_HEADER_BYTES = 8192  # safetensors header + manifest, roughly
_RANKS = (8, 16, 32, 64)
_RANK_WEIGHTS = (0.30, 0.35, 0.25, 0.10)
_MLP_SHARE = 0.3  # adapters that also target the MLP


def _location(source: str, line_number: int) -> str:
    return f"trace {source} line {line_number}"


def parse_trace_lines(lines: Iterable[str], *, source: str = "<lines>") -> list[Request]:
    """Parse trace lines (see the module docstring) into ``(key, size)`` requests.

    Raises:
        InvalidArgument: a line is not ``REF SIZE``, the reference does not parse, the size is not
            a positive decimal integer, or a key reappears with a different size. The message
            names the line number.
    """
    requests: list[Request] = []
    # Keys repeat a lot in a trace; parsing each distinct one once keeps 10^6-line reads fast.
    first_seen: dict[str, tuple[str, int, int]] = {}  # text -> (key object, size, line)
    for line_number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise InvalidArgument(
                f"{_location(source, line_number)}: expected 'tenant/name@rev SIZE_BYTES', "
                f"got {line[:120]!r}"
            )
        text, size_text = fields
        if not (size_text.isascii() and size_text.isdigit()) or int(size_text) <= 0:
            raise InvalidArgument(
                f"{_location(source, line_number)}: size {size_text[:40]!r} is not a positive "
                "integer number of bytes"
            )
        size = int(size_text)
        seen = first_seen.get(text)
        if seen is None:
            try:
                Ref.parse(text)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{_location(source, line_number)}: {exc}") from None
            first_seen[text] = (text, size, line_number)
            requests.append((text, size))
            continue
        key, known_size, known_line = seen
        if size != known_size:
            raise InvalidArgument(
                f"{_location(source, line_number)}: {text} has size {size} but line "
                f"{known_line} gave {known_size}; a key names one immutable pack"
            )
        requests.append((key, known_size))
    return requests


def read_trace(path: str | os.PathLike[str]) -> list[Request]:
    """Read a whole trace file.

    Raises:
        InvalidArgument: the file cannot be opened or is not UTF-8 text, or a line is malformed
            (the message names the line).
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            return parse_trace_lines(handle, source=source)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"trace {source} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read trace {source}: {exc.strerror or exc}") from None


def write_trace(
    path: str | os.PathLike[str], requests: Iterable[Request], *, comment: str = ""
) -> int:
    """Write ``requests`` as a trace file (temporary name, then rename) and return their count.

    Raises:
        InvalidArgument: a key contains whitespace or a size is not a positive integer; ``path``
            is left as it was in that case.
        OSError: the file cannot be written (``path`` is left as it was).
    """
    count = 0
    # No fsync (none before either): a trace lost to a power cut is generated again.
    with open_atomically(path, fsync=False, text=True) as handle:
        for line in comment.splitlines():
            handle.write(f"# {line}\n")
        for key, size in requests:
            if not key or any(ch.isspace() for ch in key):
                raise InvalidArgument(f"request {count + 1}: key {key!r} is empty or has spaces")
            if type(size) is not int or size <= 0:
                raise InvalidArgument(
                    f"request {count + 1}: size {size!r} of {key} is not a positive integer"
                )
            handle.write(f"{key} {size}\n")
            count += 1
    return count


def catalog_bytes(requests: Iterable[Request]) -> int:
    """Total bytes of the distinct keys in ``requests`` (the catalog a trace touches)."""
    sizes: dict[str, int] = {}
    for key, size in requests:
        sizes[key] = size
    return sum(sizes.values())


# --- synthetic workloads -------------------------------------------------------------------------


def synthetic_catalog(num_adapters: int, *, seed: int = 0, tenants: int = 100) -> list[Request]:
    """``num_adapters`` adapter revisions with realistic LoRA pack sizes, as ``(key, size)``.

    Raises:
        InvalidArgument: ``num_adapters`` or ``tenants`` is not positive.
    """
    if num_adapters <= 0 or tenants <= 0:
        raise InvalidArgument("num_adapters and tenants must be positive")
    rng = np.random.default_rng(seed)
    ranks = rng.choice(np.array(_RANKS), size=num_adapters, p=np.array(_RANK_WEIGHTS))
    with_mlp = rng.random(num_adapters) < _MLP_SHARE
    params_per_rank = _ATTENTION_PARAMS_PER_RANK + with_mlp * _MLP_PARAMS_PER_RANK
    sizes = ranks * params_per_rank * _LAYERS * _BYTES_PER_PARAM + _PACK_HEADER_BYTES
    owners = rng.integers(0, tenants, size=num_adapters)
    revisions = rng.integers(1, 6, size=num_adapters)
    return [
        (f"tenant-{int(owner):04d}/adapter-{index:07d}@{int(rev)}", int(size))
        for index, (owner, rev, size) in enumerate(zip(owners, revisions, sizes, strict=True))
    ]


def _zipf_ranks(rng: np.random.Generator, population: int, count: int, s: float) -> np.ndarray:
    """``count`` draws of a rank in ``[0, population)`` with P(rank i) proportional to (i+1)^-s."""
    weights = np.arange(1, population + 1, dtype=np.float64) ** -s
    cumulative = np.cumsum(weights)
    cumulative /= cumulative[-1]
    draws = np.searchsorted(cumulative, rng.random(count), side="right")
    return np.minimum(draws, population - 1)


def _check_workload(catalog: Sequence[Request], num_requests: int, s: float) -> None:
    if not catalog:
        raise InvalidArgument("the catalog is empty")
    if num_requests <= 0:
        raise InvalidArgument(f"num_requests must be positive, got {num_requests}")
    if s < 0:
        raise InvalidArgument(f"the Zipf parameter s must be >= 0, got {s}")


def _zipf_segment(
    catalog: Sequence[Request], num_requests: int, s: float, rng: np.random.Generator
) -> list[Request]:
    """Zipf(s) requests over ``catalog`` with a fresh random popularity order."""
    order = rng.permutation(len(catalog))
    ranks = _zipf_ranks(rng, len(catalog), num_requests, s)
    return [catalog[i] for i in order[ranks].tolist()]


def zipf_trace(
    catalog: Sequence[Request], num_requests: int, *, s: float = 1.0, seed: int = 0
) -> list[Request]:
    """Independent requests with Zipf(s) popularity over ``catalog``.

    Raises:
        InvalidArgument: empty catalog, non-positive ``num_requests`` or negative ``s``.
    """
    _check_workload(catalog, num_requests, s)
    return _zipf_segment(catalog, num_requests, s, np.random.default_rng(seed))


def shift_trace(
    catalog: Sequence[Request],
    num_requests: int,
    *,
    s: float = 1.0,
    phases: int = 2,
    seed: int = 0,
) -> list[Request]:
    """Zipf(s) requests whose hot set moves: ``phases`` equal phases, each with a new order.

    Raises:
        InvalidArgument: as :func:`zipf_trace`, or ``phases`` < 1.
    """
    _check_workload(catalog, num_requests, s)
    if phases < 1:
        raise InvalidArgument(f"phases must be >= 1, got {phases}")
    rng = np.random.default_rng(seed)
    trace: list[Request] = []
    for phase in range(phases):
        length = num_requests * (phase + 1) // phases - num_requests * phase // phases
        trace.extend(_zipf_segment(catalog, length, s, rng))
    return trace


def _interleave(
    base: list[Request], burst: list[Request], *, start: float, rng: np.random.Generator
) -> list[Request]:
    """Mix ``burst`` (kept in order) into ``base`` from fraction ``start`` on, one for one."""
    if not burst:
        return list(base)
    split = int(len(base) * start)
    tail = base[split:]
    mixed_length = min(len(tail), len(burst))
    # One base request between burst requests, on average, while both last.
    picks = rng.random(mixed_length + len(burst)) < 0.5
    out = base[:split]
    b = t = 0
    for take_burst in picks.tolist():
        if b < len(burst) and (take_burst or t >= len(tail)):
            out.append(burst[b])
            b += 1
        elif t < len(tail):
            out.append(tail[t])
            t += 1
    out.extend(burst[b:])
    out.extend(tail[t:])
    return out


def scan_trace(
    catalog: Sequence[Request],
    num_requests: int,
    *,
    s: float = 1.0,
    scan_share: float = 0.5,
    scan_start: float = 0.4,
    seed: int = 0,
) -> list[Request]:
    """A Zipf(s) load with one sweep over cold adapters mixed in.

    The last ``scan_share`` of the catalog is cold: the Zipf load never asks for it, and the
    sweep requests each cold adapter exactly once, interleaved one-for-one with the load from
    fraction ``scan_start`` of the trace on. ``num_requests`` counts both.

    Raises:
        InvalidArgument: as :func:`zipf_trace`, or ``scan_share`` / ``scan_start`` outside
            ``[0, 1)``, or a cold set that leaves too few requests for the load.
    """
    _check_workload(catalog, num_requests, s)
    if not (0 <= scan_share < 1 and 0 <= scan_start < 1):
        raise InvalidArgument("scan_share and scan_start must be in [0, 1)")
    warm_count = max(1, round(len(catalog) * (1 - scan_share)))
    warm, cold = list(catalog[:warm_count]), list(catalog[warm_count:])
    if len(cold) >= num_requests:
        raise InvalidArgument(
            f"a sweep of {len(cold)} cold adapters does not fit in {num_requests} requests"
        )
    rng = np.random.default_rng(seed)
    load = _zipf_segment(warm, num_requests - len(cold), s, rng)
    sweep = [cold[i] for i in rng.permutation(len(cold)).tolist()]
    return _interleave(load, sweep, start=scan_start, rng=rng)


def mixed_trace(
    catalog: Sequence[Request],
    num_requests: int,
    *,
    s: float = 0.9,
    seed: int = 0,
) -> list[Request]:
    """Everything at once: three popularity phases, and a cold sweep in the second one.

    A sixth of the catalog is cold and swept once; the rest serves a Zipf(s) load whose hot set
    moves twice.

    Raises:
        InvalidArgument: as :func:`zipf_trace`.
    """
    _check_workload(catalog, num_requests, s)
    warm_count = max(1, len(catalog) * 5 // 6)
    warm, cold = list(catalog[:warm_count]), list(catalog[warm_count:])
    if len(cold) >= num_requests:
        raise InvalidArgument(
            f"a sweep of {len(cold)} cold adapters does not fit in {num_requests} requests"
        )
    rng = np.random.default_rng(seed)
    load = shift_trace(warm, num_requests - len(cold), s=s, phases=3, seed=seed + 1)
    sweep = [cold[i] for i in rng.permutation(len(cold)).tolist()]
    return _interleave(load, sweep, start=0.4, rng=rng)
