"""The index abstraction: every adapter, revision, alias and alias move, queryable fast.

The index is derived state. It changes only by :meth:`RevisionIndex.apply` of durable log events
(``catalog.events``), in each adapter's sequence order, so replaying the log into an empty index
(``reindex``) reproduces it exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from catalog.digest import Digest
from catalog.events import Event
from catalog.model import AdapterName, AdapterSummary, AliasMove, Page, Ref, Revision

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class AdapterState:
    """What a writer must know before it appends the next event for an adapter."""

    adapter: AdapterName
    next_seq: int  # the seq the next event must carry; 1 for an adapter with no events
    next_revision: int  # the number the next push receives; numbers are never reused
    latest: int  # highest live revision, 0 when none
    live_revisions: int
    aliases: dict[str, int] = field(default_factory=dict)  # set by events; ``latest`` is not here
    created_at: float = 0.0
    updated_at: float = 0.0


class RevisionIndex(ABC):
    """Query and update the catalog's metadata. Implementations must be thread-safe."""

    @abstractmethod
    def adapter_state(self, adapter: AdapterName) -> AdapterState | None:
        """Current state of ``adapter``, or ``None`` if it has never had an event or its last
        event purged it."""

    @abstractmethod
    def next_seq(self, adapter: AdapterName) -> int:
        """The seq the next event of ``adapter`` must carry: ``adapter_state(...).next_seq``,
        1 for a name that never had an event, and one past the purge for a purged name (the
        log keeps a purged name's events, so its numbering goes on)."""

    @abstractmethod
    def apply(self, event: Event) -> None:
        """Apply one event atomically and clear any intent recorded for it.

        Raises ``Conflict`` when the writer's view was stale: ``event.seq`` is not the adapter's
        ``next_seq``, a push's number is not ``next_revision``, or an alias's ``previous`` is not
        its current target (0 = unset). Raises ``FailedPrecondition`` when the event contradicts
        the state: an alias, delete or metadata event naming a missing or deleted revision,
        removing an unset alias, or deleting a revision an alias points at (the message names
        the aliases), or purging a name that has live revisions (the message names them) or no
        events. A purge removes the adapter, its aliases and alias history; only its next seq is
        kept (:meth:`next_seq`).
        Raises ``InvalidArgument`` for a malformed event: no digest on a push, an alias named
        ``latest`` (the index keeps it on the highest live revision) or all digits (it would
        read as a revision number), a manifest field of the wrong type.
        A refused event changes nothing and keeps its intent.
        """

    def apply_many(self, events: Iterable[Event]) -> int:
        """Apply events in order (used by reindex; backends batch them into few transactions)."""
        count = 0
        for event in events:
            self.apply(event)
            count += 1
        return count

    @abstractmethod
    def generation(self) -> int:
        """A number that changes whenever a committed write may have changed an answer.

        Read caches tag what they computed with it: an answer computed while the generation
        read the same before and after is the state at that generation, and stays valid for
        as long as the generation is unchanged.
        """

    def resolve_at_generation(self, ref: Ref) -> tuple[int | None, Revision]:
        """``resolve(ref)`` and the generation whose state answered it (``None`` when a write
        committed meanwhile, so no single generation did). Backends that read one snapshot
        override this to answer from it alone; this one reads the generation around the lookup.
        """
        before = self.generation()
        revision = self.resolve(ref)
        return (before if self.generation() == before else None), revision

    @abstractmethod
    def get_revision(self, adapter: AdapterName, number: int) -> Revision | None:
        """A live revision, or ``None`` when it never existed or was deleted."""

    @abstractmethod
    def resolve(self, ref: Ref) -> Revision:
        """The live revision ``ref`` names (its ``aliases`` include ``latest`` if it is latest).

        Raises ``NotFound`` naming what is missing (adapter, revision, alias, digest) and
        ``InvalidReference`` for a digest prefix that matches more than one digest (or is shorter
        than 12 hex digits). Identical bytes pushed twice resolve to the newer live revision.
        """

    @abstractmethod
    def list_adapters(
        self, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[AdapterSummary]:
        """Adapters in ``(tenant, name)`` order.

        ``prefix`` is ``""`` (all), ``"tenant"`` (one tenant's adapters, never ``tenant2``'s) or
        ``"tenant/name"`` (that one adapter). ``page_token`` is the opaque ``next_token`` of the
        previous page of the same listing. ``page_size`` 0 means ``DEFAULT_PAGE_SIZE``; larger
        sizes are clamped to ``MAX_PAGE_SIZE``. Raises ``InvalidName`` for a bad prefix and
        ``InvalidArgument`` for a negative size or a token not from this listing.
        """

    def search_adapters(
        self,
        prefix: str = "",
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        *,
        base_id: str = "",
        tags: dict[str, str] | None = None,
        alias: str = "",
    ) -> Page[AdapterSummary]:
        """``list_adapters`` keeping only adapters whose ``latest`` revision was trained for
        ``base_id`` and whose metadata holds every ``tags`` entry, and that have ``alias`` set.

        Pages with the same tokens as ``list_adapters``; a filtered page may hold fewer than
        ``page_size`` adapters and still have a next token (``catalog.index.search``). Raises
        ``InvalidName`` (prefix or alias), ``InvalidArgument`` (size or token).
        """
        from catalog.index.search import AdapterFilter, search_adapters

        wanted = AdapterFilter(base_id=base_id, tags=dict(tags or {}), alias=alias)
        return search_adapters(self, prefix, page_size, page_token, wanted)

    @abstractmethod
    def list_revisions(
        self, adapter: AdapterName, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[Revision]:
        """Live revisions of ``adapter`` in increasing number (paged as ``list_adapters``).

        Raises ``NotFound`` for an unknown adapter.
        """

    @abstractmethod
    def alias_history(self, adapter: AdapterName, alias: str | None = None) -> list[AliasMove]:
        """Every move of ``alias`` (or of all aliases) of ``adapter``, oldest first.

        ``latest`` moves implicitly and has no history. Raises ``NotFound`` for an unknown adapter.
        """

    @abstractmethod
    def referenced_digests(self) -> Iterator[tuple[Digest, int]]:
        """Every digest that live revisions point at, with how many revisions share it."""

    @abstractmethod
    def digest_refcount(self, digest: Digest) -> int:
        """How many live revisions point at ``digest``."""

    # -- crash recovery: an intent is recorded before an event is written durably --------------

    @abstractmethod
    def add_intent(self, event: Event) -> None:
        """Remember that ``event`` is about to be written to the durable log."""

    @abstractmethod
    def drop_intent(self, adapter: AdapterName, seq: int) -> None:
        """Forget an intent whose durable write failed (``apply`` clears it on success)."""

    @abstractmethod
    def intents(self) -> list[Event]:
        """Intents left behind, e.g. by a crash between the durable write and ``apply``."""

    @abstractmethod
    def counts(self) -> dict[str, Any]:
        """``adapters``, ``revisions`` (live), ``aliases``, ``purged`` (names whose last event
        purged them), ``bytes_on_disk`` and the like."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the index; it is unusable afterwards."""
