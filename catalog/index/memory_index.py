"""A :class:`RevisionIndex` in plain dicts behind one lock: for tests and embedded use.

It exists so the conformance suite checks the ABC's semantics, not one backend's quirks; it keeps
nothing across restarts (rebuild it from the durable log). Listings sort on every call, which is
fine for thousands of adapters, not for a million.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from catalog import keys
from catalog.digest import Digest, parse_digest_prefix
from catalog.errors import FailedPrecondition
from catalog.events import Event
from catalog.index import paging, rules
from catalog.index.base import DEFAULT_PAGE_SIZE, AdapterState, RevisionIndex
from catalog.model import (
    LATEST,
    AdapterName,
    AdapterSummary,
    AliasMove,
    Page,
    Ref,
    Revision,
    Selector,
    check_part,
)


@dataclass
class _Adapter:
    next_seq: int
    next_revision: int
    created_at: float
    updated_at: float
    revisions: dict[int, Revision] = field(default_factory=dict)  # live; aliases left empty
    aliases: dict[str, int] = field(default_factory=dict)
    history: list[AliasMove] = field(default_factory=list)

    @property
    def latest(self) -> int:
        return max(self.revisions, default=0)


class MemoryIndex(RevisionIndex):
    """Everything in memory; thread-safe by one lock around every call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._adapters: dict[AdapterName, _Adapter] = {}
        self._refs: dict[Digest, int] = {}
        self._intents: dict[tuple[AdapterName, int], Event] = {}
        #: purged names without a new adapter -> the seq their next event carries
        self._purged: dict[AdapterName, int] = {}
        self._closed = False
        self._generation = 0
        self._handlers: dict[str, Callable[[_Adapter, Event], None]] = {
            "push": self._push,
            "alias": self._alias,
            "delete": self._delete,
            "metadata": self._metadata,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the index is closed")

    # -- applying events ------------------------------------------------------------------------

    def generation(self) -> int:
        return self._generation

    def apply(self, event: Event) -> None:
        rules.check_event_shape(event)
        with self._lock:
            self._check_open()
            entry = self._adapters.get(event.adapter)
            next_seq = entry.next_seq if entry else self._purged.get(event.adapter, 1)
            if event.seq != next_seq:
                raise rules.stale_seq(event, next_seq)
            if event.op == "purge":
                self._purge(entry, event)
            else:
                if entry is None:
                    entry = _Adapter(
                        next_seq=next_seq, next_revision=1, created_at=event.at, updated_at=0
                    )
                self._handlers[event.op](entry, event)
                entry.next_seq += 1
                entry.updated_at = event.at
                self._adapters[event.adapter] = entry
                self._purged.pop(event.adapter, None)
            self._intents.pop((event.adapter, event.seq), None)
            # In the same hold as the change: readers take the lock, so none sees one without
            # the other.
            self._generation += 1

    def _purge(self, entry: _Adapter | None, event: Event) -> None:
        if entry is None:
            raise rules.purge_unknown(event)
        if entry.revisions:
            raise rules.purge_live(event, sorted(entry.revisions)[:10])
        # aliases and history go with the adapter; no live revision means no digest reference
        del self._adapters[event.adapter]
        self._purged[event.adapter] = event.seq + 1

    def _push(self, entry: _Adapter, event: Event) -> None:
        if event.revision != entry.next_revision:
            raise rules.wrong_push_number(event, entry.next_revision)
        summary = rules.PackSummary.from_manifest(event.manifest)
        assert event.digest is not None
        entry.revisions[event.revision] = Revision(
            adapter=event.adapter,
            number=event.revision,
            digest=event.digest,
            base_id=summary.base_id,
            rank=summary.rank,
            alpha=summary.alpha,
            dtype=summary.dtype,
            size_bytes=event.size_bytes,
            created_at=event.at,
            target_modules=summary.target_modules,
            num_layers=summary.num_layers,
            num_experts=summary.num_experts,
            metadata=dict(event.metadata),
        )
        entry.next_revision = event.revision + 1
        self._refs[event.digest] = self._refs.get(event.digest, 0) + 1

    def _alias(self, entry: _Adapter, event: Event) -> None:
        current = entry.aliases.get(event.alias, 0)
        if event.previous != current:
            raise rules.stale_alias(event, current)
        if event.revision == 0:
            if current == 0:
                raise rules.unset_alias(event)
            del entry.aliases[event.alias]
        elif event.revision not in entry.revisions:
            raise rules.not_live(event, entry.next_revision)
        else:
            entry.aliases[event.alias] = event.revision
        entry.history.append(
            AliasMove(
                event.adapter,
                event.alias,
                current,
                event.revision,
                event.at,
                event.seq,
                event.principal,
            )
        )

    def _delete(self, entry: _Adapter, event: Event) -> None:
        revision = entry.revisions.get(event.revision)
        if revision is None:
            raise rules.not_live(event, entry.next_revision)
        holding = [alias for alias, number in entry.aliases.items() if number == event.revision]
        if holding:
            raise rules.aliased_delete(event, holding)
        del entry.revisions[event.revision]
        remaining = self._refs[revision.digest] - 1
        if remaining:
            self._refs[revision.digest] = remaining
        else:
            del self._refs[revision.digest]

    def _metadata(self, entry: _Adapter, event: Event) -> None:
        revision = entry.revisions.get(event.revision)
        if revision is None:
            raise rules.not_live(event, entry.next_revision)
        entry.revisions[event.revision] = replace(
            revision,
            metadata=rules.edited_metadata(revision.metadata, event.metadata, event.removed),
        )

    # -- reading --------------------------------------------------------------------------------

    def adapter_state(self, adapter: AdapterName) -> AdapterState | None:
        with self._lock:
            self._check_open()
            entry = self._adapters.get(adapter)
            if entry is None:
                return None
            return AdapterState(
                adapter=adapter,
                next_seq=entry.next_seq,
                next_revision=entry.next_revision,
                latest=entry.latest,
                live_revisions=len(entry.revisions),
                aliases=dict(entry.aliases),
                created_at=entry.created_at,
                updated_at=entry.updated_at,
            )

    def next_seq(self, adapter: AdapterName) -> int:
        with self._lock:
            self._check_open()
            entry = self._adapters.get(adapter)
            return entry.next_seq if entry else self._purged.get(adapter, 1)

    def get_revision(self, adapter: AdapterName, number: int) -> Revision | None:
        with self._lock:
            self._check_open()
            entry = self._adapters.get(adapter)
            if entry is None or number not in entry.revisions:
                return None
            return self._with_aliases(entry, entry.revisions[number])

    def resolve_at_generation(self, ref: Ref) -> tuple[int | None, Revision]:
        with self._lock:  # writes bump the generation under this lock
            return self._generation, self._resolve_locked(ref)

    def resolve(self, ref: Ref) -> Revision:
        with self._lock:
            return self._resolve_locked(ref)

    def _resolve_locked(self, ref: Ref) -> Revision:
        self._check_open()
        entry = self._adapters.get(ref.adapter)
        if entry is None:
            raise rules.unknown_adapter(ref.adapter)
        number = self._number_of(entry, ref)
        revision = entry.revisions.get(number)
        if revision is None:
            raise rules.missing_revision(ref.adapter, number, entry.next_revision)
        return self._with_aliases(entry, revision)

    @staticmethod
    def _number_of(entry: _Adapter, ref: Ref) -> int:
        if ref.selector is Selector.REVISION:
            return int(ref.value)
        if ref.selector is Selector.ALIAS:
            if ref.value == LATEST:
                if not entry.revisions:
                    raise rules.no_live_revision(ref.adapter)
                return entry.latest
            if ref.value not in entry.aliases:
                raise rules.unknown_alias(ref.adapter, ref.value)
            return entry.aliases[ref.value]
        algorithm, hex_prefix = parse_digest_prefix(ref.value)
        matches: dict[Digest, int] = {}
        for number, revision in entry.revisions.items():
            digest = revision.digest
            if digest.algorithm == algorithm and digest.hex.startswith(hex_prefix):
                matches[digest] = max(number, matches.get(digest, 0))
        if not matches:
            raise rules.unknown_digest(ref.adapter, ref.value)
        if len(matches) > 1:
            raise rules.ambiguous_digest(ref.adapter, ref.value, len(matches))
        return next(iter(matches.values()))

    @staticmethod
    def _with_aliases(entry: _Adapter, revision: Revision) -> Revision:
        names = [alias for alias, number in entry.aliases.items() if number == revision.number]
        if revision.number == entry.latest:
            names.append(LATEST)
        return replace(revision, aliases=tuple(sorted(names)), metadata=dict(revision.metadata))

    def list_adapters(
        self, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[AdapterSummary]:
        parts = paging.adapter_prefix(prefix)
        size = paging.page_size_of(page_size)
        scan = keys.prefix(*parts)
        after = paging.decode_token(page_token, scan) if page_token else b""
        with self._lock:
            self._check_open()
            chosen = sorted(
                (key, name)
                for name in self._adapters
                if (key := keys.encode(name.tenant, name.name)).startswith(scan) and key > after
            )[: size + 1]
            items = tuple(
                AdapterSummary(
                    adapter=name,
                    latest=entry.latest,
                    revision_count=len(entry.revisions),
                    aliases=dict(entry.aliases),
                    created_at=entry.created_at,
                    updated_at=entry.updated_at,
                )
                for _, name in chosen[:size]
                for entry in (self._adapters[name],)
            )
        token = paging.encode_token(chosen[size - 1][0]) if len(chosen) > size else ""
        return Page(items, token)

    def list_revisions(
        self, adapter: AdapterName, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[Revision]:
        size = paging.page_size_of(page_size)
        adapter_key = keys.encode(adapter.tenant, adapter.name)
        after = paging.decode_token(page_token, adapter_key) if page_token else b""
        with self._lock:
            self._check_open()
            entry = self._adapters.get(adapter)
            if entry is None:
                raise rules.unknown_adapter(adapter)
            chosen = sorted(
                (key, number)
                for number in entry.revisions
                if (key := adapter_key + keys.encode(number)) > after
            )[: size + 1]
            items = tuple(
                self._with_aliases(entry, entry.revisions[number]) for _, number in chosen[:size]
            )
        token = paging.encode_token(chosen[size - 1][0]) if len(chosen) > size else ""
        return Page(items, token)

    def alias_history(self, adapter: AdapterName, alias: str | None = None) -> list[AliasMove]:
        if alias is not None:
            check_part("alias", alias)
        with self._lock:
            self._check_open()
            entry = self._adapters.get(adapter)
            if entry is None:
                raise rules.unknown_adapter(adapter)
            return [move for move in entry.history if alias is None or move.alias == alias]

    def referenced_digests(self) -> Iterator[tuple[Digest, int]]:
        with self._lock:
            self._check_open()
            snapshot = sorted(self._refs.items())
        yield from snapshot

    def digest_refcount(self, digest: Digest) -> int:
        with self._lock:
            self._check_open()
            return self._refs.get(digest, 0)

    # -- intents --------------------------------------------------------------------------------

    def add_intent(self, event: Event) -> None:
        rules.check_event_shape(event)
        with self._lock:
            self._check_open()
            self._intents[(event.adapter, event.seq)] = event

    def drop_intent(self, adapter: AdapterName, seq: int) -> None:
        with self._lock:
            self._check_open()
            self._intents.pop((adapter, seq), None)

    def intents(self) -> list[Event]:
        with self._lock:
            self._check_open()
            return [self._intents[key] for key in sorted(self._intents)]

    def counts(self) -> dict[str, Any]:
        with self._lock:
            self._check_open()
            return {
                "adapters": len(self._adapters),
                "revisions": sum(len(entry.revisions) for entry in self._adapters.values()),
                "aliases": sum(len(entry.aliases) for entry in self._adapters.values()),
                "intents": len(self._intents),
                "blobs": len(self._refs),
                "purged": len(self._purged),
                "bytes_on_disk": 0,
            }

    def close(self) -> None:
        with self._lock:
            self._closed = True
