"""Build events the way the catalog's writer does: read the adapter's state, take the next seq."""

from __future__ import annotations

import hashlib
from typing import Any

from catalog.digest import Digest
from catalog.events import Event
from catalog.index.base import RevisionIndex
from catalog.model import AdapterName

MANIFEST: dict[str, Any] = {
    "format": 1,
    "base_id": "tiny-llama-64",
    "rank": 8,
    "alpha": 16.0,
    "dtype": "bfloat16",
    "num_layers": 2,
    "num_experts": 0,
    "modules": [{"name": "q_proj", "in": 64, "out": 64}, {"name": "v_proj", "in": 64, "out": 32}],
}


def digest_of(label: str) -> Digest:
    return Digest("sha256", hashlib.sha256(label.encode()).hexdigest())


def name(text: str) -> AdapterName:
    return AdapterName.parse(text)


class Writer:
    """Makes the next event for an adapter from the index's own state (as the service will)."""

    def __init__(self, index: RevisionIndex) -> None:
        self.index = index
        self.clock = 1_700_000_000.0
        self.events: list[Event] = []

    def _next(self, adapter: AdapterName) -> tuple[int, int]:
        state = self.index.adapter_state(adapter)
        # a purged name has no state, but its events go on numbering past the purge
        return (state.next_seq, state.next_revision) if state else (self.index.next_seq(adapter), 1)

    def _tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def event(self, adapter: AdapterName, op: str, **fields: Any) -> Event:
        seq, _ = self._next(adapter)
        return Event(adapter=adapter, seq=seq, op=op, at=self._tick(), **fields)  # type: ignore[arg-type]

    def push_event(
        self,
        adapter: AdapterName,
        *,
        digest: Digest | None = None,
        manifest: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Event:
        seq, number = self._next(adapter)
        return Event(
            adapter=adapter,
            seq=seq,
            op="push",
            at=self._tick(),
            revision=number,
            digest=digest or digest_of(f"{adapter}@{number}"),
            size_bytes=1000 + number,
            manifest=MANIFEST if manifest is None else manifest,
            metadata=metadata or {},
        )

    def apply(self, event: Event) -> Event:
        self.index.apply(event)
        self.events.append(event)
        return event

    def push(self, adapter: AdapterName, **fields: Any) -> Event:
        return self.apply(self.push_event(adapter, **fields))

    def alias(self, adapter: AdapterName, alias: str, revision: int, previous: int = -1) -> Event:
        if previous < 0:
            state = self.index.adapter_state(adapter)
            previous = state.aliases.get(alias, 0) if state else 0
        return self.apply(
            self.event(adapter, "alias", alias=alias, revision=revision, previous=previous)
        )

    def delete(self, adapter: AdapterName, revision: int) -> Event:
        return self.apply(self.event(adapter, "delete", revision=revision))

    def metadata(self, adapter: AdapterName, revision: int, metadata: dict[str, str]) -> Event:
        return self.apply(self.event(adapter, "metadata", revision=revision, metadata=metadata))

    def purge(self, adapter: AdapterName) -> Event:
        return self.apply(self.event(adapter, "purge"))
