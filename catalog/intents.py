"""Settling write intents whose durable log write has an unknown outcome.

Every event is first recorded in the index as an *intent*, then written to the durable log
(a conditional put), then applied (``Catalog._append``). When the log write fails with
``Unavailable`` (a store that timed out or dropped the connection), the write may still have
landed: SeaweedFS paused mid-request completes it once resumed. Dropping the intent then would
leave the durable log holding an event the index never applies (a revision that a rebuilt index
has and the live one has not). Such an intent is kept instead and settled here: applied when
the log holds the event, dropped when it does not; on a thread that retries while the store is
down, and at the next start (``Catalog.recover``) if the process ends first.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from catalog.errors import Conflict, DeadlineExceeded, Unavailable
from catalog.events import Event, log_key
from catalog.model import AdapterName

if TYPE_CHECKING:
    from catalog.core import Catalog

log = logging.getLogger(__name__)

#: How long a settling thread keeps retrying a store that does not answer (then the next start
#: settles the intent), and its longest pause between tries.
GIVE_UP_S = 600.0
_MAX_PAUSE_S = 5.0


def settle_intent(catalog: Catalog, adapter: AdapterName, seq: int) -> bool:
    """Apply or drop the intent ``(adapter, seq)`` as the durable log says (the caller holds
    what ``Catalog.recover`` holds); whether it was applied. Raises what the store's ``get``
    raises (``Unavailable`` while it is down)."""
    index = catalog.index
    if not any(i.adapter == adapter and i.seq == seq for i in index.intents()):
        return False  # settled already
    data = catalog.store.get(log_key(adapter, seq))
    if data is None:
        index.drop_intent(adapter, seq)
        return False
    event = Event.decode(data, key=log_key(adapter, seq))
    # next_seq, not adapter_state: an applied purge leaves no state but its seq
    if index.next_seq(event.adapter) > event.seq:
        index.drop_intent(adapter, seq)
        return False
    index.apply(event)
    return True


def settle_earlier_intents(catalog: Catalog, event: Event) -> None:
    """Before ``event`` is written: settle the kept intents of its adapter (the caller holds
    the adapter's lock), so that its log write cannot take the place of one that had landed.
    Raises ``Conflict`` when one had (``event``'s sequence number is taken: retry), and what
    the store's ``get`` raises."""
    for intent in catalog.index.intents():
        if intent.adapter == event.adapter:
            settle_intent(catalog, intent.adapter, intent.seq)
    if catalog.index.next_seq(event.adapter) > event.seq:
        raise Conflict(
            f"an earlier write of {event.adapter} whose outcome was unknown had landed and is "
            "applied now; retry"
        )


class IntentSettler:
    """Settles kept intents of ``catalog`` on threads of their own (see the module doc)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._closing = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def pending(self) -> int:
        """Intents being settled now."""
        with self._lock:
            return len(self._threads)

    def settle_later(self, adapter: AdapterName, seq: int) -> None:
        thread = threading.Thread(
            target=self._settle, args=(adapter, seq), name="loracat-intent", daemon=True
        )
        with self._lock:
            if self._closing.is_set():
                return  # the next start settles it
            self._threads.add(thread)
        thread.start()

    def close(self) -> None:
        """Stop retrying (a try in progress ends first); what is left, the next start settles."""
        self._closing.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def _settle(self, adapter: AdapterName, seq: int) -> None:
        pause, deadline = 0.25, time.monotonic() + GIVE_UP_S
        try:
            while not self._closing.is_set() and time.monotonic() < deadline:
                try:
                    if self._catalog.settle_intent(adapter, seq):
                        log.warning("applied %s event %d: its log write had landed", adapter, seq)
                    return
                except (Unavailable, DeadlineExceeded):
                    self._closing.wait(pause)
                    pause = min(pause * 2, _MAX_PAUSE_S)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
