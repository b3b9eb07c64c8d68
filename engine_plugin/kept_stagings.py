"""Stagings that only borrow a fetched buffer, kept with that buffer for the next fetch of it.

A fetching attach reads the pack, parses its header, checks its manifest against the engine
and stages it (``staging.stage_pack``). When the source hands out a read-only buffer (which by
``PackSource``'s contract never changes) and every staged tensor is a view into it, the
staging is nothing but the header's offsets, shapes and routes laid over those bytes: a
function of the buffer's bytes and the engine alone. A colocated ``CatalogClient`` returns the
*same* buffer object for a repeated read of a pack whose store file it keeps mapped
(``catalog.client.mapped_files``), after checking every chunk of it against its checksum
again. So when a fetch returns the very object a kept staging borrows, that staging is what
staging it again would build, and the parse, the manifest check and the staging (~0.3 ms of
a 16.8 MB dense pack's colocated attach on the 2-core dev machine) are skipped. The fetch
itself, with every check it makes, runs as before: only what it returns decides.

What is kept, and what is not:

* only stagings whose tensors all borrow the buffer (no conversion, no pinned or ``flat``
  arena: those hold private copies, which is what the host tier is for);
* only while the source holds the buffer object it handed out: an entry refers to it weakly
  and goes when it goes. So a kept staging never keeps memory alive that would otherwise be
  freed (its views hold what the buffer object holds anyway), and a source that hands out a
  fresh buffer per fetch (a copy out of the tier's chunks, a gRPC stream's) leaves nothing
  here; ``bytes`` (which take no weak references) are never kept;
* by digest, way of staging (``into_slot``) and buffer: a fetch that returns another buffer
  (a different source, or the file mapped afresh) is staged as usual and kept beside;
* a staging made without the engine's own finite checks (the source vouched for the values)
  serves only fetches that vouch too; one that ran the checks serves every fetch of the same
  immutable bytes;
* at most ``max_entries``, the least recently used dropped first.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch

from catalog.model import Revision
from engine_plugin.staging import StagedAdapter

__all__ = ["KeptStagings"]

DEFAULT_MAX_ENTRIES = 64


@dataclass(frozen=True, slots=True)
class _Kept:
    buffer: weakref.ref[Any]
    vouched: bool
    staged: StagedAdapter


def _address_span(data: object) -> tuple[int, int] | None:
    """``(first address, bytes)`` of a read-only contiguous buffer; None for any other."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        return None
    if not view.readonly or not view.c_contiguous or view.nbytes == 0:
        return None
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable; nothing writes through this tensor.
        warnings.simplefilter("ignore", UserWarning)
        start = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
    return start, view.nbytes


def borrows_only(staged: StagedAdapter, data: object) -> bool:
    """Whether every tensor of ``staged`` is a view into the read-only buffer ``data``."""
    span = _address_span(data)
    if span is None or staged.flat is not None or staged.pinned:
        return False
    start, nbytes = span
    for tensor in staged.copy_sources:
        storage = tensor.untyped_storage()
        first = storage.data_ptr()
        if not (start <= first and first + storage.nbytes() <= start + nbytes):
            return False
    return True


class KeptStagings:
    """Borrowing stagings by digest, served only to a fetch of the same buffer object (see the
    module docstring). Thread safe."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        # Reentrant: a buffer may be freed (and its entry's callback run) on a thread that
        # holds the lock, when dropping an entry releases the last reference to it.
        self._lock = threading.RLock()
        self._kept: OrderedDict[tuple[str, bool, int], _Kept] = OrderedDict()
        #: Fetches served a kept staging, and stagings kept.
        self.counters = {"hits": 0, "kept": 0}

    def get(
        self, revision: Revision, data: object, *, into_slot: bool, vouched: bool
    ) -> StagedAdapter | None:
        """The kept staging of ``revision``'s digest when it borrows ``data`` itself (the same
        object) and may serve a fetch that ``vouched`` (or not) for the values; else None."""
        key = (str(revision.digest), into_slot, id(data))
        with self._lock:
            kept = self._kept.get(key)
            if kept is None or kept.buffer() is not data or (kept.vouched and not vouched):
                return None
            self._kept.move_to_end(key)
            self.counters["hits"] += 1
        staged = kept.staged
        # One digest may be several revisions (a re-push of the same bytes): same staging.
        return staged if staged.revision == revision else replace(staged, revision=revision)

    def keep(self, data: object, staged: StagedAdapter, *, into_slot: bool, vouched: bool) -> bool:
        """Keep ``staged`` (made from ``data``, with the engine's finite checks skipped when
        ``vouched``) if it only borrows ``data`` and ``data`` takes weak references; returns
        whether it was kept."""
        if not borrows_only(staged, data):
            return False
        key = (staged.digest, into_slot, id(data))
        try:
            buffer = weakref.ref(data, lambda ref: self._forget(key, ref))
        except TypeError:  # bytes, say
            return False
        with self._lock:
            self._kept[key] = _Kept(buffer, vouched, staged)
            self._kept.move_to_end(key)
            self.counters["kept"] += 1
            while len(self._kept) > self.max_entries:
                self._kept.popitem(last=False)
        return True

    def _forget(self, key: tuple[str, bool, int], ref: weakref.ref[Any]) -> None:
        """A kept buffer was freed: drop its entry (unless a later one took its key)."""
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept.buffer is ref:
                del self._kept[key]

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)
