"""Deletes of the catalog: one revision, or every revision of an adapter.

Mixed into ``catalog.core.Catalog``. Each deleted revision is one ``delete`` event on the write
path, written under the adapter's lock; with ``force`` the aliases of the adapter are removed
first, each by an ``alias`` event (``catalog.alias_moves``). The name itself stays until it is
purged (``catalog.name_purge``); the pack bytes stay in the durable store until ``gc``
(``catalog.maintenance``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from catalog.catalog_parts import CatalogParts
from catalog.errors import FailedPrecondition, NotFound
from catalog.events import Event
from catalog.model import LATEST, AdapterName, AliasMove, Ref, Revision, every_item


class _LockedAliasMove(Protocol):
    """``AliasMoves._move_alias_locked``: a move made while the caller holds the adapter's lock."""

    def __call__(
        self, adapter: AdapterName, alias: str, revision: int, *, expected: int | None
    ) -> AliasMove: ...


class RevisionDeletes(CatalogParts):
    """``delete`` of :class:`catalog.core.Catalog`."""

    _move_alias_locked: _LockedAliasMove

    def delete(
        self, ref: Ref | str, *, all_revisions: bool = False, force: bool = False
    ) -> list[int]:
        """Delete the revision ``ref`` names, or with ``all_revisions`` the whole adapter.

        Deleting a revision an alias points at raises ``FailedPrecondition`` naming the alias,
        for one revision and for all of them alike; with ``all_revisions`` and ``force`` the
        aliases are removed first. Numbers are never reused. Pack bytes stay in the durable
        store until ``gc``. Raises ``NotFound``, ``FailedPrecondition``.
        """
        parsed = Ref.parse(ref) if isinstance(ref, str) else ref
        adapter = parsed.adapter
        with self._swap.shared(), self._adapter_locks.hold(adapter):
            state = self.index.adapter_state(adapter)
            if state is None:
                raise NotFound(f"adapter {adapter} not found")
            if all_revisions:
                held = sorted(a for a in state.aliases if a != LATEST)
                if held and not force:
                    raise FailedPrecondition(
                        f"{adapter} has alias{'es' if len(held) > 1 else ''} "
                        f"{', '.join(f'{a}->{state.aliases[a]}' for a in held)}; move or "
                        "remove them first, or force the delete to drop them"
                    )
                for alias in held:
                    self._move_alias_locked(adapter, alias, 0, expected=None)
                numbers = [r.number for r in self._all_live_revisions(adapter)]
                if not numbers:
                    raise NotFound(f"adapter {adapter} has no live revisions")
            else:
                revision = self.index.resolve(parsed)
                held = sorted(
                    a for a, n in state.aliases.items() if n == revision.number and a != LATEST
                )
                if held:
                    raise FailedPrecondition(
                        f"revision {adapter}@{revision.number} is aliased as {', '.join(held)}; "
                        "move or remove the alias first"
                    )
                numbers = [revision.number]
            for number in numbers:
                current = self.index.adapter_state(adapter)
                assert current is not None
                self._append(
                    Event(
                        adapter=adapter,
                        seq=current.next_seq,
                        op="delete",
                        at=time.time(),
                        revision=number,
                    )
                )
        return numbers

    def _all_live_revisions(self, adapter: AdapterName) -> Iterator[Revision]:
        return every_item(lambda token: self.index.list_revisions(adapter, 1000, token))
