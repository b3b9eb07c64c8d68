"""Slot writes and clears, ordered against the compute that reads the slots.

On CUDA every write and clear runs on a side stream that first waits for the last read of the
slot (an event recorded when a batch's lease on it ended), and the next batch's compute waits
for the latest write; nothing a kernel reads is ever half-written, and copies never race it.
On CPU, when torch runs one thread, a helper thread shares the strided writes and finite
checks of fetching attaches (see ``shared_work``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from engine_plugin.slots import SlotPool
from engine_plugin.staging import StagedAdapter

__all__ = ["SlotWriter"]


class SlotWriter:
    """Writes ``pool``'s slots on ``device``; ``attach_threads`` as ``ResidentEngine`` takes it.

    Not thread safe: the engine calls it under its lock or for a slot it has claimed.
    """

    def __init__(self, pool: SlotPool, device: torch.device, attach_threads: int | None) -> None:
        self.pool = pool
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream: torch.cuda.Stream | None = None
        if self.cuda:
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._last_write: Any = None  # torch.cuda.Event of the latest slot write
        self._last_read: dict[int, Any] = {}  # slot -> torch.cuda.Event
        if attach_threads is None:
            attach_threads = 2 if not self.cuda and torch.get_num_threads() == 1 else 1
        #: The thread that shares a fetching attach's work on CPU (None: no sharing).
        self.helper: ThreadPoolExecutor | None = None
        if not self.cuda and attach_threads > 1:
            self.helper = ThreadPoolExecutor(
                1, "slot-copy", initializer=torch.set_num_threads, initargs=(1,)
            )
            pool.copy_helper = self.helper

    def write(self, slot: int, staged: StagedAdapter, *, clear_first: bool) -> int:
        """Copy ``staged`` into ``slot``; returns the bytes copied. ``clear_first``: an evicted
        tenant's weights are zeroed where the new one does not overwrite them."""
        write = self.pool.replace if clear_first else self.pool.write
        if self._stream is None:
            return write(slot, staged)
        with torch.cuda.stream(self._stream):
            self._wait_for_readers(slot)
            moved = write(slot, staged, non_blocking=staged.pinned)
            self._record_write()
        return moved

    def clear(self, slot: int) -> None:
        """Zero ``slot``, so stale weights never reach a later tenant."""
        if self._stream is None:
            self.pool.clear(slot)
            return
        with torch.cuda.stream(self._stream):
            self._wait_for_readers(slot)
            self.pool.clear(slot)
            self._record_write()

    def read_ended(self, slot: int) -> None:
        """A batch stopped using ``slot``: a later write to it waits for what was queued."""
        if self.cuda:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(self.device))
            self._last_read[slot] = event

    def wait_for_writes(self) -> None:
        """Make the compute stream wait for the latest slot write (CUDA)."""
        if self.cuda and self._last_write is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_write)

    def close(self) -> None:
        """Stop the helper thread; later writes copy on the caller's thread alone."""
        if self.helper is not None:
            self.pool.copy_helper = None
            self.helper.shutdown()
            self.helper = None

    def _wait_for_readers(self, slot: int) -> None:
        event = self._last_read.pop(slot, None)
        if event is not None and self._stream is not None:
            self._stream.wait_event(event)

    def _record_write(self) -> None:
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._stream)
        self._last_write = event
