"""What the catalog's mixins may use of the catalog they are mixed into.

``Catalog`` (``catalog.core``) is split along its seams into mixins (alias moves, metadata
edits, deletes, purge, maintenance, engines, pack reads and leases); the attributes several of
them rely on are stated here, once, and each mixin states at the top of its class any others it
uses, so mypy checks them and the class that mixes them in is the one place that provides them.
"""

from __future__ import annotations

from collections.abc import Callable

from catalog.events import Event
from catalog.hints import HintBroker
from catalog.index.base import RevisionIndex
from catalog.locks import KeyedLocks, ReadWriteLock


class CatalogParts:
    """Attributes ``catalog.core.Catalog`` provides to its mixins."""

    index: RevisionIndex
    hints: HintBroker
    attach_aliases: tuple[str, ...]
    _swap: ReadWriteLock
    _adapter_locks: KeyedLocks
    #: The one write path: intent, durable log write, index apply (``Catalog._append``).
    _append: Callable[[Event], None]
