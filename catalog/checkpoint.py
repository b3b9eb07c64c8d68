"""Log checkpoints: the durable log in one compressed object, so a rebuild reads little of S3.

Rebuilding the index from the durable log (``reindex``) reads one small object per event; on S3
each GET costs about a millisecond of client CPU, so 10^5 revisions take minutes. A checkpoint
is one object holding every event of the log up to some point; a rebuild reads the newest valid
checkpoint plus only the log objects written after it (the *tail*), found by listing the log,
which is cheap (about 1000 keys per request).

Why a checkpoint can never contradict the log: log events are immutable (each is written once,
with a conditional put, and never rewritten or deleted) and each adapter's events are numbered
1, 2, 3, ... without gaps. A checkpoint records, for each adapter, a prefix ``1..n`` of that
numbering, copied from the log (byte for byte; only an event spread over several lines, which
our writer never produces, is re-encoded onto one). Later events only extend the numbering, so
"checkpoint + the log objects numbered above ``n``" is exactly the log. Checkpoints are derived
data: deleting any or all of them loses nothing.

The object, ``checkpoints/<events:012d>-<unix ms:013d>.jsonl.zst`` (newest sorts last; written
with a conditional put, never overwritten), is one zstd frame of JSON lines::

    {"format": "loracat-checkpoint", "version": 1, "events": N, "covers": {"t/n": seq, ...}, ...}
    <event 1, exactly as in its log object>
    ...
    <event N>
    {"sha256":"<hex digest of every byte above this line>"}

Events are in ``(adapter, seq)`` order, each adapter's from 1 to ``covers[adapter]``. A
checkpoint whose frame does not decode, whose trailer is missing (truncation) or whose checksum
does not match is skipped with a warning, and the next older one (or the full log) is used.

    replay = load_log(store)              # newest valid checkpoint + tail, checked
    index.apply_many(replay)              # events in (adapter, seq) order
    info = write_checkpoint(store)        # the next checkpoint: previous one + tail
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import zstandard

from catalog.errors import CatalogError, Conflict, DataLoss, InvalidArgument
from catalog.events import LOG_PREFIX, Event, parse_log_key
from catalog.model import AdapterName
from catalog.storage.base import BlobStore

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoints/"
CHECKPOINT_FORMAT = "loracat-checkpoint"
CHECKPOINT_VERSION = 1
#: Checkpoints ``write_checkpoint`` keeps by default (the new one and its predecessor, so a
#: reader that chose the predecessor a moment ago still finds it).
DEFAULT_KEEP = 2
#: Log objects per ``get_many`` call when reading the tail.
FETCH_BATCH = 2000
DEFAULT_LEVEL = 3

_NAME = re.compile(r"checkpoints/(\d{12})-(\d{13})\.jsonl\.zst")
_TRAILER = re.compile(rb'\{"sha256":"([0-9a-f]{64})"\}\n')
_TRAILER_LEN = len(b'{"sha256":""}\n') + 64
_READ_CHUNK = 1 << 20
#: Uncompressed bytes handed to the compressor at a time while writing.
_WRITE_CHUNK = 1 << 20


def checkpoint_key(events: int, created_at: float) -> str:
    """Object key of a checkpoint of ``events`` events made at ``created_at`` (unix seconds).

    The log only grows, so a checkpoint covering more events sorts after one covering fewer.
    """
    return f"{CHECKPOINT_PREFIX}{events:012d}-{round(created_at * 1000):013d}.jsonl.zst"


def list_checkpoints(store: BlobStore) -> list[str]:
    """Checkpoint object keys, newest first; other objects under ``checkpoints/`` are ignored."""
    names = [key for key in store.list(CHECKPOINT_PREFIX) if _NAME.fullmatch(key)]
    return sorted(names, reverse=True)


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`write_checkpoint` did.

    ``name`` is the checkpoint now newest (``""`` when the log is empty); ``written`` is False
    when nothing was new since the previous checkpoint, which ``name`` then names.
    """

    name: str
    written: bool
    events: int
    adapters: int
    #: Events read from the log tail (all of them when there was no previous checkpoint).
    new_events: int
    #: Compressed size of the checkpoint object, and the size of its JSON lines.
    size_bytes: int
    raw_bytes: int
    seconds: float
    #: The checkpoint this one was built from (``""``: built from the log alone).
    previous: str = ""
    pruned: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["pruned"] = list(self.pruned)
        return doc


@dataclass(frozen=True)
class _Checkpoint:
    """A checkpoint whose frame, trailer, checksum and header have been checked."""

    name: str
    blob: bytes
    events: int
    covers: dict[AdapterName, int]
    raw_bytes: int

    def lines(self) -> Iterator[bytes]:
        """The event lines (newline stripped), from a second decompression of the frame."""
        reader = zstandard.ZstdDecompressor().stream_reader(self.blob)
        with io.BufferedReader(reader, _READ_CHUNK) as text:
            text.readline()  # the header
            for _ in range(self.events):
                yield text.readline().removesuffix(b"\n")

    def entries(self) -> Iterator[tuple[Event, bytes]]:
        """Decoded events with their lines; raises ``DataLoss`` where they disagree with the
        header, which the checksum cannot catch (it proves only that the writer finished)."""
        current: AdapterName | None = None
        expected = 0
        seen = 0
        for number, line in enumerate(self.lines(), start=2):
            event = Event.decode(line, key=f"{self.name} line {number}")
            if event.adapter != current:
                if current is not None:
                    self._check_covered(current, expected)
                    if not current < event.adapter:
                        raise self._contradiction(f"{event.adapter} comes after {current}")
                current, expected = event.adapter, 0
                seen += 1
            expected += 1
            if event.seq != expected:
                raise self._contradiction(f"{event.adapter} has event {event.seq}, not {expected}")
            yield event, line
        if current is not None:
            self._check_covered(current, expected)
        if seen != len(self.covers):
            raise self._contradiction(f"{seen} adapters, the header names {len(self.covers)}")

    def _check_covered(self, adapter: AdapterName, last: int) -> None:
        if self.covers.get(adapter) != last:
            raise self._contradiction(
                f"{adapter} ends at event {last}, the header says {self.covers.get(adapter)}"
            )

    def _contradiction(self, what: str) -> DataLoss:
        return DataLoss(
            f"checkpoint {self.name} contradicts its own header ({what}); it was not written by "
            "write_checkpoint. Delete it (the log is intact) and reindex"
        )


def _open_checkpoint(name: str, blob: bytes) -> _Checkpoint:
    """Check ``blob`` whole without keeping it decompressed. Raises ``DataLoss`` saying why."""
    hasher = hashlib.sha256()
    held = b""  # the last _TRAILER_LEN bytes seen: the trailer once the frame ends
    header = bytearray()
    header_done = False
    newlines = 0
    raw_bytes = 0
    last_byte = -1
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(blob)
        while chunk := reader.read(_READ_CHUNK):
            raw_bytes += len(chunk)
            data = held + chunk
            body = memoryview(data)[: max(0, len(data) - _TRAILER_LEN)]
            held = data[len(body) :]
            hasher.update(body)
            newlines += data.count(b"\n", 0, len(body))
            if body:
                last_byte = data[len(body) - 1]
            if not header_done:
                end = data.find(b"\n", 0, len(body))
                header += body if end < 0 else body[:end]
                header_done = end >= 0
    except zstandard.ZstdError as exc:
        raise DataLoss(f"checkpoint {name} does not decompress: {exc}") from exc
    trailer = _TRAILER.fullmatch(held)
    if trailer is None or not header_done or last_byte != ord("\n"):
        raise DataLoss(f"checkpoint {name} is truncated: it does not end with its checksum")
    if trailer.group(1).decode() != hasher.hexdigest():
        raise DataLoss(f"checkpoint {name} is corrupt: its sha256 does not match its contents")
    events, covers = _parse_header(name, bytes(header))
    if newlines - 1 != events:
        raise DataLoss(f"checkpoint {name} holds {newlines - 1} events, its header says {events}")
    return _Checkpoint(name, blob, events, covers, raw_bytes)


def _parse_header(name: str, line: bytes) -> tuple[int, dict[AdapterName, int]]:
    try:
        doc = json.loads(line)
        if doc.get("format") != CHECKPOINT_FORMAT or doc.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
        events = doc["events"]
        covers = {AdapterName.parse(k): v for k, v in doc["covers"].items()}
        if type(events) is not int or not all(type(v) is int and v >= 1 for v in covers.values()):
            raise ValueError("event counts must be positive integers")
    except (ValueError, KeyError, AttributeError, CatalogError) as exc:
        raise DataLoss(f"checkpoint {name} has an unreadable header: {exc}") from exc
    if sum(covers.values()) != events:
        raise DataLoss(f"checkpoint {name}: its header's adapters do not add up to {events}")
    return events, covers


class LogReplay:
    """The durable log as events in ``(adapter, seq)`` order: a checkpoint plus the tail.

    Made by :func:`load_log`, which has already chosen and checked the checkpoint and fetched
    and checked the tail; iterating decodes the checkpoint a second time and merges the tail in.
    It can be iterated more than once. Iterating raises ``DataLoss`` only for a checkpoint whose
    checksum holds but whose events contradict its header (a writer bug, not corruption).
    """

    def __init__(
        self,
        checkpoint: _Checkpoint | None,
        tail: dict[AdapterName, list[tuple[Event, bytes]]],
        skipped: tuple[str, ...],
        missing_from_log: int,
    ) -> None:
        self._checkpoint = checkpoint
        self._tail = tail
        #: The checkpoint used (``""``: none, the whole log was read).
        self.checkpoint = checkpoint.name if checkpoint else ""
        self.checkpoint_events = checkpoint.events if checkpoint else 0
        #: The checkpoint's compressed and uncompressed sizes (0 without one).
        self.checkpoint_bytes = len(checkpoint.blob) if checkpoint else 0
        self.checkpoint_raw_bytes = checkpoint.raw_bytes if checkpoint else 0
        #: Log objects read (everything after the checkpoint).
        self.tail_events = sum(len(events) for events in tail.values())
        self.events = self.checkpoint_events + self.tail_events
        #: Newer checkpoints passed over because they were unreadable (each logged a warning).
        self.skipped = skipped
        #: Events the checkpoint holds whose log objects are gone (logged as a warning; the log
        #: is never deleted from, so this means someone removed objects by hand).
        self.missing_from_log = missing_from_log
        #: Each adapter's last event after replay.
        self.covers: dict[AdapterName, int] = dict(checkpoint.covers) if checkpoint else {}
        for adapter, events in tail.items():
            self.covers[adapter] = events[-1][0].seq

    def __iter__(self) -> Iterator[Event]:
        for event, _ in self.entries():
            yield event

    def entries(self) -> Iterator[tuple[Event, bytes]]:
        """Each event with its one-line JSON encoding (what a checkpoint stores)."""
        if self._checkpoint is None:
            for adapter in sorted(self._tail):
                yield from self._tail[adapter]
            return
        pending = iter(sorted(self._tail))
        waiting = next(pending, None)  # the next tail adapter not yet merged in
        current: AdapterName | None = None
        for entry in self._checkpoint.entries():
            adapter = entry[0].adapter
            if adapter != current:
                if current is not None:
                    yield from self._tail.get(current, ())
                while waiting is not None and waiting < adapter:
                    yield from self._tail[waiting]
                    waiting = next(pending, None)
                if waiting == adapter:
                    waiting = next(pending, None)
                current = adapter
            yield entry
        if current is not None:
            yield from self._tail.get(current, ())
        while waiting is not None:
            yield from self._tail[waiting]
            waiting = next(pending, None)


def load_log(
    store: BlobStore, *, use_checkpoints: bool = True, batch: int = FETCH_BATCH
) -> LogReplay:
    """The durable log of ``store``: its newest valid checkpoint plus the log objects after it.

    Unreadable checkpoints are skipped with a warning (see :attr:`LogReplay.skipped`);
    ``use_checkpoints=False`` reads the whole log. Before returning, every adapter's events are
    checked to run 1, 2, 3, ... without a gap, and every tail object to decode and to hold the
    event its key names, so nothing has been applied anywhere when one of these fails.

    Raises:
        DataLoss: a gap in an adapter's events, a log object that is corrupt, names another
            event, vanished while being read, or a key under ``log/`` that is not a log entry.
        Unavailable: the store cannot be reached.
    """
    skipped: list[str] = []
    checkpoint = _newest_valid(store, skipped) if use_checkpoints else None
    covers = checkpoint.covers if checkpoint else {}
    listed = _list_log(store)
    wanted: list[str] = []
    missing = 0
    for adapter, seqs in listed.items():
        covered = covers.get(adapter, 0)
        after = [seq for seq in seqs if seq > covered]
        missing += covered - (len(seqs) - len(after))
        for expected, seq in enumerate(after, start=covered + 1):
            if seq != expected:
                raise DataLoss(f"durable log of {adapter} has a gap: event {expected} is missing")
        prefix = f"{LOG_PREFIX}{adapter.tenant}/{adapter.name}/"
        wanted.extend(f"{prefix}{seq:012d}.json" for seq in after)
    missing += sum(seq for adapter, seq in covers.items() if adapter not in listed)
    if missing:
        log.warning(
            "checkpoint %s holds %d event(s) whose log objects are missing from %s; the "
            "checkpoint's copies are used",
            checkpoint.name if checkpoint else "",
            missing,
            store.url,
        )
    tail = _fetch(store, wanted, batch)
    return LogReplay(checkpoint, tail, tuple(skipped), missing)


def write_checkpoint(
    store: BlobStore, *, keep: int | None = DEFAULT_KEEP, level: int = DEFAULT_LEVEL
) -> CheckpointInfo:
    """Write the next checkpoint: the newest valid one plus the log tail, checked as
    :func:`load_log` checks them. Nothing is written when nothing is new (or the log is
    empty). With ``keep`` (>= 1), all but the newest ``keep`` checkpoints are then deleted.

    Raises:
        InvalidArgument: ``keep`` below 1 or a zstd ``level`` outside 1-22.
        DataLoss: as :func:`load_log`.
        Conflict: another writer made a checkpoint of the same name at the same millisecond.
        Unavailable: the store cannot be reached.
    """
    if keep is not None and keep < 1:
        raise InvalidArgument(f"keep must be at least 1 checkpoint, got {keep}")
    if not 1 <= level <= 22:
        raise InvalidArgument(f"zstd level must be 1-22, got {level}")
    started = time.perf_counter()
    replay = load_log(store)
    if replay.tail_events == 0:
        return CheckpointInfo(
            name=replay.checkpoint,
            written=False,
            events=replay.events,
            adapters=len(replay.covers),
            new_events=0,
            size_bytes=replay.checkpoint_bytes,
            raw_bytes=replay.checkpoint_raw_bytes,
            seconds=time.perf_counter() - started,
            previous=replay.checkpoint,
        )
    created_at = time.time()
    name = checkpoint_key(replay.events, created_at)
    header = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "events": replay.events,
        "covers": {str(adapter): seq for adapter, seq in sorted(replay.covers.items())},
        "created_at": created_at,
        "previous": replay.checkpoint,
    }
    blob, raw_bytes = _compress(
        json.dumps(header, separators=(",", ":")).encode(),
        (line for _, line in replay.entries()),
        level,
    )
    if not store.put(name, blob, if_absent=True):
        raise Conflict(f"checkpoint {name} exists in {store.url} already: another writer; retry")
    pruned = tuple(prune_checkpoints(store, keep)) if keep is not None else ()
    info = CheckpointInfo(
        name=name,
        written=True,
        events=replay.events,
        adapters=len(replay.covers),
        new_events=replay.tail_events,
        size_bytes=len(blob),
        raw_bytes=raw_bytes,
        seconds=time.perf_counter() - started,
        previous=replay.checkpoint,
        pruned=pruned,
    )
    log.info(
        "wrote checkpoint %s: %d events (%d new), %d bytes",
        name,
        info.events,
        info.new_events,
        info.size_bytes,
    )
    return info


def prune_checkpoints(store: BlobStore, keep: int = DEFAULT_KEEP) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted keys.

    Raises:
        InvalidArgument: ``keep`` below 1 (the newest checkpoint is never deleted here).
    """
    if keep < 1:
        raise InvalidArgument(f"keep must be at least 1 checkpoint, got {keep}")
    doomed = list_checkpoints(store)[keep:]
    for name in doomed:
        store.delete(name)
    return doomed


def verify_checkpoints(store: BlobStore) -> list[str]:
    """Read every checkpoint whole; one line per problem (an empty list: all are sound)."""
    problems: list[str] = []
    for name in list_checkpoints(store):
        blob = store.get(name)
        if blob is None:
            continue  # pruned meanwhile
        try:
            for _ in _open_checkpoint(name, blob).entries():
                pass
        except DataLoss as exc:
            problems.append(str(exc))
    return problems


# -- reading ------------------------------------------------------------------------------------


def _newest_valid(store: BlobStore, skipped: list[str]) -> _Checkpoint | None:
    for name in list_checkpoints(store):
        blob = store.get(name)
        if blob is None:  # pruned by a writer since the listing
            continue
        try:
            return _open_checkpoint(name, blob)
        except DataLoss as exc:
            log.warning("%s; using an older checkpoint or the full log instead", exc)
            skipped.append(name)
    return None


def _list_log(store: BlobStore) -> dict[AdapterName, list[int]]:
    """Each adapter's event numbers found under ``log/``, ascending."""
    by_prefix: dict[str, tuple[AdapterName, list[int]]] = {}
    for key in store.list(LOG_PREFIX):
        prefix, _, leaf = key.rpartition("/")
        found = by_prefix.get(prefix)
        if found is None:
            adapter, _ = parse_log_key(key)
            found = by_prefix[prefix] = (adapter, [])
        digits = leaf[:12]
        if not (len(leaf) == 17 and leaf.endswith(".json") and digits.isascii()):
            raise DataLoss(f"unexpected object in the durable log: {key!r}")
        if not digits.isdigit() or int(digits) < 1:  # events are numbered from 1
            raise DataLoss(f"unexpected object in the durable log: {key!r}")
        found[1].append(int(digits))
    out = {}
    for adapter, seqs in by_prefix.values():
        seqs.sort()
        out[adapter] = seqs
    return out


def _fetch(
    store: BlobStore, keys: list[str], batch: int
) -> dict[AdapterName, list[tuple[Event, bytes]]]:
    """Fetch and decode log objects; each event comes with its one-line encoding."""
    tail: dict[AdapterName, list[tuple[Event, bytes]]] = {}
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        fetched = store.get_many(chunk)
        for key in chunk:
            data = fetched.get(key)
            if data is None:
                raise DataLoss(f"log object {key} vanished while it was being read")
            adapter, seq = parse_log_key(key)
            event = Event.decode(data, key=key)
            if event.adapter != adapter or event.seq != seq:
                raise DataLoss(f"log object {key} holds event {event.adapter}#{event.seq}")
            # Our own writer never puts a newline in an event; one from elsewhere might.
            line = event.encode() if b"\n" in data else data
            tail.setdefault(adapter, []).append((event, line))
    return tail


# -- writing ------------------------------------------------------------------------------------


def _compress(header: bytes, lines: Iterable[bytes], level: int) -> tuple[bytes, int]:
    """One zstd frame of ``header``, ``lines`` and the checksum trailer; also the raw size."""
    out = io.BytesIO()
    hasher = hashlib.sha256()
    raw_bytes = 0
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    with compressor.stream_writer(out, closefd=False) as writer:
        pending: list[bytes] = [header, b"\n"]
        size = len(header) + 1

        def flush() -> None:
            nonlocal raw_bytes
            data = b"".join(pending)
            hasher.update(data)
            writer.write(data)
            raw_bytes += len(data)
            pending.clear()

        for line in lines:
            pending += (line, b"\n")
            size += len(line) + 1
            if size >= _WRITE_CHUNK:
                flush()
                size = 0
        flush()
        trailer = b'{"sha256":"' + hasher.hexdigest().encode() + b'"}\n'
        writer.write(trailer)
        raw_bytes += len(trailer)
    return out.getvalue(), raw_bytes


__all__ = [
    "CHECKPOINT_PREFIX",
    "DEFAULT_KEEP",
    "CheckpointInfo",
    "LogReplay",
    "checkpoint_key",
    "list_checkpoints",
    "load_log",
    "prune_checkpoints",
    "verify_checkpoints",
    "write_checkpoint",
]
