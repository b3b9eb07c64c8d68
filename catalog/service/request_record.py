"""The server's record of the requests it answered, for capacity planning.

A bounded ring (``collections.deque(maxlen=...)``): the newest ``capacity`` resolves and fetches,
each ``(time, kind, ref, size_bytes, engine)`` where ``ref`` is the revision the request resolved
to (``tenant/name@N``: an alias moves, a revision's pack and size do not). Appending is one
tuple and one deque append under the GIL (thread-safe, no lock), so it stays on for ``Resolve``
on the event loop;
``bench/bench_request_record.py`` measures what it costs there. ``loracat trace export`` reads
it back in the trace format of ``loracat plan``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from catalog.errors import InvalidArgument

#: Entries kept by default: ~100 bytes each in memory.
DEFAULT_RECORD_ENTRIES = 100_000
#: The metadata key a caller names itself by (an engine id); the peer address otherwise.
ENGINE_METADATA_KEY = "loracat-engine"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    time: float
    kind: str  # "resolve" or "fetch"
    ref: str
    size_bytes: int
    engine: str


class RequestRecord:
    """The newest ``capacity`` requests, oldest first."""

    def __init__(self, capacity: int = DEFAULT_RECORD_ENTRIES) -> None:
        """Raises ``InvalidArgument`` when ``capacity`` is not positive."""
        if capacity <= 0:
            raise InvalidArgument(f"the request record needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self._entries: deque[tuple[float, str, str, int, str]] = deque(maxlen=capacity)
        self._appended = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dropped(self) -> int:
        """Entries rotated out since the start."""
        return max(0, self._appended - self.capacity)

    def add(self, kind: str, ref: str, size_bytes: int, engine: str) -> None:
        self._appended += 1  # a lost increment under a race only misstates `dropped`
        self._entries.append((time.time(), kind, ref, size_bytes, engine))

    def since(self, since: float = 0.0, engine: str = "") -> list[RecordedRequest]:
        """Entries at or after ``since`` (seconds since the epoch), of ``engine`` if given."""
        # list() of a deque is atomic under the GIL: appends during the copy cannot tear it.
        entries = list(self._entries)
        return [
            RecordedRequest(*entry)
            for entry in entries
            if entry[0] >= since and (not engine or entry[4] == engine)
        ]


def caller_of(context: Any) -> str:
    """Who made a call: its ``loracat-engine`` metadata, else the peer address."""
    try:
        for key, value in context.invocation_metadata() or ():
            if key == ENGINE_METADATA_KEY:
                return str(value)
        return str(context.peer())
    except (AttributeError, RuntimeError):
        return ""
