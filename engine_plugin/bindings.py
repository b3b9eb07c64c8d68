"""What references mean on one engine: alias bindings, remembered exact references and pins.

An alias reference (``t/a``, ``t/a@serving``) is *bound* to the revision the engine serves for
it until an ``attach`` moves it (a hot swap); an exact reference (``t/a@3``,
``t/a@sha256:...``) names an immutable revision, so once seen it is remembered; a pin keeps what
its reference means resident, following the binding when that moves. Keeping these apart from
the slots lets ``ResidentEngine`` answer "which revision does this row mean?" without asking the
catalog, and "is this revision still wanted?" in O(1).

Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from catalog.model import AdapterName, Ref, Revision, Selector

#: Parsed references and remembered exact ones kept at most (caches of immutable facts:
#: dropping them only costs lookups).
REF_CACHE_SIZE = 4096
#: Past this many bindings, those whose revision holds no slot are dropped (their next use
#: resolves through the catalog again), so a sweep over 10^5 names does not grow the table.
BINDINGS_LIMIT = 4096


class References:
    """Alias bindings, exact references seen, pins, and a cache of parsed references."""

    def __init__(self) -> None:
        self._parsed: dict[str, Ref] = {}
        self._bindings: dict[str, Revision] = {}
        # How many bindings name each digest, so "is this revision still bound?" is O(1) on
        # the attach path instead of a scan of every binding (a 10^5-adapter sweep).
        self._bound: Counter[str] = Counter()
        self._exact: dict[str, Revision] = {}
        #: Pinned references, as their parsed text.
        self.pins: set[str] = set()

    def parse(self, ref: str) -> Ref:
        """``ref`` parsed (cached). Raises: ``InvalidReference``."""
        parsed = self._parsed.get(ref)
        if parsed is None:
            parsed = Ref.parse(ref)
            if len(self._parsed) >= REF_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[ref] = parsed
        return parsed

    def adapter_of(self, key: str) -> AdapterName:
        return self.parse(key).adapter

    def bound(self, key: str) -> Revision | None:
        """The revision alias reference ``key`` is bound to."""
        return self._bindings.get(key)

    def bindings(self) -> Iterator[tuple[str, Revision]]:
        return iter(self._bindings.items())

    def bound_digests(self) -> set[str]:
        return set(self._bound)

    def is_bound(self, digest: str) -> bool:
        return self._bound[digest] > 0

    def known(self, ref: Ref, resident: Iterable[Revision]) -> Revision | None:
        """The revision ``ref`` means here without asking the catalog: its binding (alias), or
        an exact reference seen before or matching a ``resident`` revision."""
        key = str(ref)
        if ref.selector is Selector.ALIAS:
            return self._bindings.get(key)
        known = self._exact.get(key)
        if known is not None:
            return known
        for revision in resident:
            if revision.adapter != ref.adapter:
                continue
            if (ref.selector is Selector.REVISION and revision.number == int(ref.value)) or (
                ref.selector is Selector.DIGEST and str(revision.digest).startswith(ref.value)
            ):
                self.remember_exact(key, revision)
                return revision
        return None

    def remember_exact(self, key: str, revision: Revision) -> None:
        if len(self._exact) >= REF_CACHE_SIZE:
            self._exact.clear()
        self._exact[key] = revision

    def bind(self, ref: Ref, revision: Revision, held: Callable[[], set[str]]) -> set[str]:
        """Point alias reference ``ref`` at ``revision`` (an exact one is only remembered).

        Past ``BINDINGS_LIMIT`` bindings, those whose digest is not in ``held()`` (the slots')
        are dropped first. Returns the digests that thereby lost their last binding.
        """
        if ref.selector is not Selector.ALIAS:
            self.remember_exact(str(ref), revision)
            return set()
        if len(self._bindings) >= BINDINGS_LIMIT:
            kept = held()
            for key in [k for k, r in self._bindings.items() if str(r.digest) not in kept]:
                self.unbind(key)
        key = str(ref)
        old = self._bindings.get(key)
        if old is not None:
            self.unbind(key)
        self._bindings[key] = revision
        self._bound[str(revision.digest)] += 1
        if old is None or old.digest == revision.digest or self.is_bound(str(old.digest)):
            return set()
        return {str(old.digest)}

    def unbind(self, key: str) -> None:
        digest = str(self._bindings.pop(key).digest)
        self._bound[digest] -= 1
        if self._bound[digest] <= 0:
            del self._bound[digest]

    def pinned_digests(self, resident: Iterable[Revision]) -> set[str]:
        """The digests the pins mean now (``resident``: the slots' revisions)."""
        revisions = list(resident)
        return {
            str(known.digest)
            for key in self.pins
            if (known := self.known(self.parse(key), revisions)) is not None
        }

    def pin_digest(self, key: str, resident: Iterable[Revision]) -> str | None:
        known = self.known(self.parse(key), resident)
        return str(known.digest) if known is not None else None
