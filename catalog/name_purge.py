"""Purge of a deleted name: the catalog forgets an adapter all of whose revisions are deleted.

After ``delete(..., all_revisions=True)`` the name stays in listings with no live revision, and
its alias history stays readable. A purge is one ``purge`` event on the write path: the index
drops the adapter, its aliases and alias history, and a later push of the name starts a new
adapter at revision 1, as a name freed on the Hugging Face Hub or in MLflow's registry would.
The durable log keeps every event of the name (the log is append-only), numbered on past the
purge, so ``reindex`` and checkpoints replay to the same index. Pack bytes were already
unreferenced by the deletes and are freed by ``gc``.

Mixed into ``catalog.core.Catalog``.
"""

from __future__ import annotations

import time

from catalog.catalog_parts import CatalogParts
from catalog.errors import FailedPrecondition, NotFound
from catalog.events import Event
from catalog.model import AdapterName

#: How many live revision numbers a refusal names before it says "and N more".
_NAMED_IN_REFUSAL = 10


class NamePurge(CatalogParts):
    """``purge`` of :class:`catalog.core.Catalog`."""

    def purge(self, adapter: AdapterName) -> int:
        """Forget ``adapter`` for good; returns how many revisions it had held (all deleted).

        Raises ``NotFound`` for a name the catalog does not hold (never pushed, or purged
        already) and ``FailedPrecondition`` naming the live revisions while any remain: delete
        them first (``delete(ref, all_revisions=True)``). A purge never deletes a revision.
        """
        with self._swap.shared(), self._adapter_locks.hold(adapter):
            state = self.index.adapter_state(adapter)
            if state is None:
                raise NotFound(f"adapter {adapter} not found")
            if state.live_revisions:
                page = self.index.list_revisions(adapter, _NAMED_IN_REFUSAL)
                named = ", ".join(str(revision.number) for revision in page.items)
                more = state.live_revisions - len(page.items)
                raise FailedPrecondition(
                    f"cannot purge {adapter}: revision{'s' if state.live_revisions > 1 else ''}"
                    f" {named}{f' and {more} more' if more > 0 else ''} still live; delete them"
                    f" first (loracat rm {adapter} --all)"
                )
            self._append(Event(adapter=adapter, seq=state.next_seq, op="purge", at=time.time()))
            return state.next_revision - 1
