"""Alias moves of the catalog: compare-and-swap moves, attach hints and rollback.

Mixed into ``catalog.core.Catalog``; every move is one ``alias`` event on the write path.
"""

from __future__ import annotations

import time

from catalog.catalog_parts import CatalogParts
from catalog.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from catalog.events import Event
from catalog.index.rules import check_alias_name
from catalog.model import AdapterName, AliasMove, Hint


class AliasMoves(CatalogParts):
    """``set_alias`` and ``rollback`` of :class:`catalog.core.Catalog`."""

    def set_alias(
        self, adapter: AdapterName, alias: str, revision: int, *, expected: int | None = None
    ) -> AliasMove:
        """Point ``alias`` at ``revision`` (0 removes it) if it currently points at ``expected``.

        ``expected=None`` skips the check; ``expected=0`` requires the alias to be unset.
        Raises ``InvalidName``, ``NotFound`` (adapter or revision), ``Conflict`` (lost CAS).
        """
        check_alias_name(alias)
        if revision < 0:
            raise InvalidArgument(f"revision must be >= 0, got {revision}")
        with self._swap.shared(), self._adapter_locks.hold(adapter):
            return self._move_alias_locked(adapter, alias, revision, expected=expected)

    def _move_alias_locked(
        self, adapter: AdapterName, alias: str, revision: int, *, expected: int | None
    ) -> AliasMove:
        state = self.index.adapter_state(adapter)
        if state is None:
            raise NotFound(f"adapter {adapter} not found")
        current = state.aliases.get(alias, 0)
        if expected is not None and expected != current:
            pointed = f"revision {current}" if current else "nothing"
            raise Conflict(
                f"alias {adapter}@{alias} points at {pointed}, expected {expected or 'unset'}"
            )
        if revision and self.index.get_revision(adapter, revision) is None:
            raise NotFound(f"revision {adapter}@{revision} not found")
        if not revision and not current:
            raise NotFound(f"alias {adapter}@{alias} not found")
        now = time.time()
        if revision == current:
            return AliasMove(adapter, alias, current, revision, now, 0)
        event = Event(
            adapter=adapter,
            seq=state.next_seq,
            op="alias",
            at=now,
            revision=revision,
            alias=alias,
            previous=current,
        )
        self._append(event)
        if revision and alias in self.attach_aliases:
            self._hint_attach(adapter, alias, revision)
        return AliasMove(adapter, alias, current, revision, now, event.seq)

    def _hint_attach(self, adapter: AdapterName, alias: str, number: int) -> None:
        target = self.index.get_revision(adapter, number)
        if target is None:  # pragma: no cover - checked just before under the same lock
            return
        self.hints.publish(
            Hint(
                kind="attach",
                ref=f"{adapter}@{number}",
                digest=str(target.digest),
                base_id=target.base_id,
                reason=f"{adapter}@{alias} moved to {number}",
                at=time.time(),
            )
        )

    def rollback(
        self, adapter: AdapterName, alias: str, *, expected: int | None = None
    ) -> AliasMove:
        """Move ``alias`` back to where it pointed before its last move.

        Raises ``NotFound`` (no such alias history), ``FailedPrecondition`` (nothing earlier to
        return to, or that revision was deleted), ``Conflict`` (lost CAS).
        """
        check_alias_name(alias)
        with self._swap.shared(), self._adapter_locks.hold(adapter):
            if self.index.adapter_state(adapter) is None:
                raise NotFound(f"adapter {adapter} not found")
            history = self.index.alias_history(adapter, alias)
            if not history:
                raise NotFound(f"alias {adapter}@{alias} has never been set")
            last = history[-1]
            if last.previous == 0:
                raise FailedPrecondition(
                    f"alias {adapter}@{alias} has no earlier revision to roll back to"
                )
            if self.index.get_revision(adapter, last.previous) is None:
                raise FailedPrecondition(
                    f"cannot roll back {adapter}@{alias}: revision {last.previous} was deleted"
                )
            return self._move_alias_locked(
                adapter,
                alias,
                last.previous,
                expected=last.revision if expected is None else expected,
            )
