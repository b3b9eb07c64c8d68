"""Alias moves of the catalog: compare-and-swap moves, attach hints and rollback.

Mixed into ``catalog.core.Catalog``; every move is one ``alias`` event on the write path.
"""

from __future__ import annotations

import time

from catalog.catalog_parts import CatalogParts
from catalog.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    InvalidReference,
    NotFound,
)
from catalog.events import Event
from catalog.index.rules import check_alias_name
from catalog.model import AdapterName, AliasMove, Hint, Ref


class AliasMoves(CatalogParts):
    """``set_alias`` and ``rollback`` of :class:`catalog.core.Catalog`."""

    def set_alias(
        self,
        adapter: AdapterName,
        alias: str,
        revision: int = 0,
        *,
        expected: int | None = None,
        target: str = "",
    ) -> AliasMove:
        """Point ``alias`` at ``revision`` (0 removes it) if it currently points at ``expected``.

        ``target`` names the revision instead of ``revision``: a number, an alias (``serving``,
        ``latest``) or a digest (prefix) of ``adapter``, resolved under the same lock as the
        move. ``expected=None`` skips the check; ``expected=0`` requires the alias to be unset.
        Raises ``InvalidName``, ``InvalidArgument`` (both or a bad target), ``NotFound``
        (adapter, revision or target), ``Conflict`` (lost CAS).
        """
        check_alias_name(alias)
        if revision < 0:
            raise InvalidArgument(f"revision must be >= 0, got {revision}")
        if target and revision:
            raise InvalidArgument("give the revision as a number or as a target, not both")
        with self._swap.shared(), self._adapter_locks.hold(adapter):
            if target:
                revision = self._target_number(adapter, target)
            return self._move_alias_locked(adapter, alias, revision, expected=expected)

    def _target_number(self, adapter: AdapterName, target: str) -> int:
        """The live revision number ``target`` (number, alias or digest) names in ``adapter``."""
        try:
            ref = Ref.parse(f"{adapter}@{target}")
        except InvalidReference as exc:
            raise InvalidArgument(
                f"target {target[:80]!r} is not a revision number, alias or digest: {exc}"
            ) from None
        return self.index.resolve(ref).number

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
        self,
        adapter: AdapterName,
        alias: str,
        *,
        expected: int | None = None,
        to: str = "",
    ) -> AliasMove:
        """Move ``alias`` back one step of its history, or with ``to`` to that revision (a
        number, alias or digest).

        Each step walks back (see :func:`rollback_stack`): after moves 1 -> 2 -> 3, rollbacks go
        to 2, then 1, then fail. ``expected`` defaults to where the alias points now, so a move
        made meanwhile by someone else makes the rollback lose, never overwrites that move.

        Raises ``NotFound`` (adapter, alias never set, or ``to``), ``FailedPrecondition``
        (nothing earlier to return to, or that revision was deleted), ``Conflict`` (lost CAS).
        """
        check_alias_name(alias)
        with self._swap.shared(), self._adapter_locks.hold(adapter):
            state = self.index.adapter_state(adapter)
            if state is None:
                raise NotFound(f"adapter {adapter} not found")
            current = state.aliases.get(alias, 0)
            if to:
                destination = self._target_number(adapter, to)
            else:
                history = self.index.alias_history(adapter, alias)
                if not history:
                    raise NotFound(f"alias {adapter}@{alias} has never been set")
                stack = rollback_stack(history)
                if len(stack) < 2:
                    raise FailedPrecondition(
                        f"alias {adapter}@{alias} has no earlier revision to roll back to"
                    )
                destination = stack[-2]
                if self.index.get_revision(adapter, destination) is None:
                    raise FailedPrecondition(
                        f"cannot roll back {adapter}@{alias}: revision {destination} was "
                        "deleted; roll back to a live one with --to N"
                    )
            return self._move_alias_locked(
                adapter, alias, destination, expected=current if expected is None else expected
            )


def rollback_stack(history: list[AliasMove]) -> list[int]:
    """Where rollbacks of an alias walk back to, oldest first; the last entry is its target now.

    Replays the alias's moves as an undo stack: a move to the entry below the top (what a
    rollback makes, or the same move by hand) pops the top; any other move pushes; removing
    the alias empties the stack, so rollback never resurrects a removed alias.
    """
    stack: list[int] = []
    for move in history:
        if move.revision == 0:
            stack = []
        elif len(stack) >= 2 and stack[-2] == move.revision:
            stack.pop()
        else:
            if not stack and move.previous:
                stack.append(move.previous)
            stack.append(move.revision)
    return stack
