"""One revision's pack, from the engine's source to a staging the slots can take.

The engine's single flight (one fetch per digest however many callers ask at once) and its
host tier sit around this; what is here is the one fetch: read the pack through the source
(``sources.fetch_checked``: the source's own checks, and whether it vouched for the values),
reuse a staging kept with the very buffer it returned (``kept_stagings``), or parse its header
(a parse is kept per header, see ``ParsedHeaders``), check its manifest against the engine and
stage it (``staging``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from catalog.model import Revision
from catalog.pack import ParsedHeaders
from engine_plugin.compatibility import AdapterFit
from engine_plugin.kept_stagings import KeptStagings
from engine_plugin.sources import PackSource, fetch_checked
from engine_plugin.staging import StagedAdapter, stage_pack

__all__ = ["PackStager"]


class PackStager:
    """Fetches, checks and stages packs for an engine of ``dtype`` whose adapters ``fit``.

    ``pin_memory``: stage into pinned host memory (a CUDA engine); ``flat``: stage into one
    flat arena (the slots' one-launch copier takes it); ``helper``: the thread that shares the
    finite checks and strided copies of a fetching attach on CPU (``slot_writes``).
    Thread safe: the engine calls it from attaching and prefetching threads at once.
    """

    def __init__(
        self,
        source: PackSource,
        fit: AdapterFit,
        dtype: torch.dtype,
        *,
        pin_memory: bool,
        flat: bool,
        helper: ThreadPoolExecutor | None,
    ) -> None:
        self.source = source
        self.fit = fit
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.flat = flat
        self.helper = helper
        # Headers parsed, kept by their bytes: a pack fetched again (its staging evicted), or
        # a new revision laid out like one seen before (a hot swap), skips the parse.
        self.headers = ParsedHeaders()
        self.kept = KeptStagings()

    def stage(self, revision: Revision, *, into_slot: bool) -> tuple[StagedAdapter, float, float]:
        """``revision``'s pack staged, with the seconds spent fetching and staging it.

        ``into_slot``: an attach waits for it, to copy it into a slot at once. Its ``lora_B``
        is then borrowed from the fetched bytes when it can be (see ``staging``).

        Raises:
            Whatever the source raises (``NotFound``, ``DataLoss``, ...); ``InvalidPack`` for
            a pack that does not parse or holds NaN or infinite values;
            ``IncompatibleAdapter`` for one that does not fit the engine's base.
        """
        started = time.perf_counter()
        data, values_checked = fetch_checked(self.source, revision)
        fetched = time.perf_counter()
        # The same buffer fetched again (a kept map, every chunk checked again) is staged as
        # before: see ``kept_stagings``.
        staged = self.kept.get(revision, data, into_slot=into_slot, vouched=values_checked)
        if staged is None:
            pack = self.headers.read(data)
            staged = stage_pack(
                revision,
                pack,
                dtype=self.dtype,
                pin_memory=self.pin_memory,
                routes=self.fit.check_manifest(revision, pack.manifest),
                # A source's read-only buffer is the immutable pack (PackSource's contract).
                borrow=memoryview(data).readonly,
                borrow_b=into_slot,
                helper=self.helper,
                flat=self.flat,
                values_checked=values_checked,
            )
            self.kept.keep(data, staged, into_slot=into_slot, vouched=values_checked)
        return staged, fetched - started, time.perf_counter() - fetched
