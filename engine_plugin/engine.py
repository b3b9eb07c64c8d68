"""``ResidentEngine``: one resident base model, adapters attached live into preallocated slots.

How a reference becomes a slot
------------------------------
The engine keeps *bindings* from alias references (``t/a``, which means alias ``latest``, and
``t/a@serving``) to the revision it serves for them, so the forward path never waits on the
catalog for an adapter it already holds. ``attach(ref)`` always asks the catalog, loads the
revision and binds ``ref`` to it (only ``ref``: a bare ``t/a`` means ``latest`` everywhere, so
``attach("t/a@serving")`` leaves what ``t/a`` serves alone); that is a hot swap when ``ref``
was bound to another revision: calls already running keep the old slot (they hold leases on
it), new calls get the new one, and the old slot is zeroed and freed when its last lease ends.
With a helper thread (CPU, ``attach_threads``) an idle old slot is zeroed there and ``attach``
returns once the new revision serves (``engine_plugin.slot_reclaimer``).
A reference the engine has not seen is resolved through the catalog on first use and bound.
Exact references (``t/a@3``, ``t/a@sha256:...``) name immutable revisions and are cached.

Slots and leases
----------------
Every running ``forward``/``generate`` holds a lease on each slot its rows use; leased and
pinned slots are never evicted. When every slot is leased or pinned, attaching raises
``ResourceExhausted`` (after waiting up to ``slot_wait_s`` for a slot to come free). An
evicted or released slot is zeroed before anyone else can use it.

CUDA
----
Slot writes (copies from pinned host buffers, zeroing) run on a side stream. Each write waits
for the compute work that last read the slot (an event recorded when its lease ended), and each
forward makes the compute stream wait for every write issued before it, so copies never race
compute in either direction. On CPU the same code runs synchronously.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn

from catalog.errors import InvalidArgument, NotFound, ResourceExhausted
from catalog.model import Ref, Revision, Selector
from engine_plugin.bindings import References
from engine_plugin.compatibility import AdapterFit
from engine_plugin.experts import (
    PROJECTIONS,
    ExpertsTarget,
    MultiLoRAExperts,
)
from engine_plugin.layers import (
    BatchContext,
    BatchPlan,
    MultiLoRALinear,
    find_decoder_layers,
    group_shared_inputs,
    linear_targets,
    plan_batch,
    replace_module,
)
from engine_plugin.pack_stager import PackStager
from engine_plugin.prefetch import Prefetcher, ResidencyReporter
from engine_plugin.residency import (
    EvictionPolicy,
    HostTier,
    SlotEntry,
    SlotsExhausted,
    SlotState,
    SlotTable,
)
from engine_plugin.slot_reclaimer import SlotReclaimer
from engine_plugin.slot_writes import SlotWriter
from engine_plugin.slots import SlotPool
from engine_plugin.sources import PackSource, ResidencySink
from engine_plugin.staging import StagedAdapter
from engine_plugin.targets import find_targets

DEFAULT_HOST_BUDGET = 1 << 30
_PLAN_CACHE_SIZE = 64


class ResidentEngine:
    """A resident causal LM whose target linears carry ``num_slots`` live LoRA slots.

    ``catalog`` is anything with ``resolve(ref)`` and ``fetch(revision)`` (a
    ``catalog.client.CatalogClient``, or ``engine_plugin.LocalPackSource``); when it can also
    ``register_engine``/``report_residency``, the engine registers at construction and reports
    what it holds after every change.

    Args:
        model: a transformers causal LM; moved to ``device``. Its decoder-layer linears, and
            the fused MoE experts modules of transformers 5 models (``mlp.experts``: gate, up
            and down projections, one LoRA per expert; see ``engine_plugin.experts``), are
            replaced by multi-LoRA layers in place.
        num_slots: adapters resident at once. max_rank: the largest rank a slot holds.
        base_id: the base this engine serves; packs trained for another base are refused
            (local paths compared by the folder they name, see ``catalog.bases``). Defaults to
            the model config's ``name_or_path`` (the folder a model was loaded from, or its hub
            id); when empty, only shapes are checked.
        target_modules: module paths inside a decoder layer to make adaptable (``q_proj`` or
            ``self_attn.q_proj``, or an experts module: ``experts``, ``mlp.experts``); default
            every linear and every fused experts module in the layer.
        host_budget_bytes: bytes of staged packs kept in host memory.
        slot_wait_s: how long an attach waits for a busy slot to come free before refusing.
        attach_threads: threads sharing a fetching attach's slot write and checks on CPU (2 by
            default when torch runs one thread, else 1; see ``shared_work``).

    Raises:
        ValueError: ``num_slots``/``max_rank`` below 1, no decoder layers, or a target module
            that the model lacks.
    """

    def __init__(
        self,
        model: nn.Module,
        catalog: PackSource,
        *,
        num_slots: int = 8,
        max_rank: int = 16,
        device: str | torch.device = "cpu",
        base_id: str | None = None,
        target_modules: Sequence[str] | None = None,
        host_budget_bytes: int = DEFAULT_HOST_BUDGET,
        slot_wait_s: float = 0.0,
        engine_id: str | None = None,
        prefetch_workers: int = 2,
        slot_policy: EvictionPolicy[str] | None = None,
        host_policy: EvictionPolicy[str] | None = None,
        attach_threads: int | None = None,
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots and max_rank must be >= 1, got {num_slots}, {max_rank}")
        self._catalog = catalog
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        config = getattr(model, "config", None)
        self.base_id = (
            base_id if base_id is not None else (getattr(config, "name_or_path", "") or None)
        )
        self.engine_id = engine_id or f"engine-{uuid.uuid4().hex[:12]}"
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.slot_wait_s = slot_wait_s

        if any(isinstance(m, MultiLoRALinear | MultiLoRAExperts) for m in self.model.modules()):
            raise ValueError("the model already carries LoRA slots (it is wrapped by an engine)")
        self._layers = find_decoder_layers(self.model)
        targets, experts = find_targets(self._layers, target_modules)
        first_weight = next(iter(targets.values()))[1]
        self.dtype = first_weight.dtype
        self.pool = SlotPool(
            {name: t for name, (t, _) in targets.items()},
            num_slots,
            max_rank,
            self.dtype,
            self.device,
        )
        #: The fused MoE experts modules carrying LoRA slots, by path inside a decoder layer.
        self.experts: dict[str, ExpertsTarget] = experts
        #: What adapters this engine can take (checked before fetching, then before staging).
        self.fit = AdapterFit(
            self.engine_id, self.base_id, max_rank, len(self._layers), self.pool, experts
        )
        self._context = BatchContext()
        for index, layer in enumerate(self._layers):
            for name, base in linear_targets(layer).items():
                if name in self.pool.modules:
                    wrapped = MultiLoRALinear(base, self.pool.modules[name], index, self._context)
                    replace_module(layer, name, wrapped)
            for path, target in experts.items():
                slots = [self.pool.modules[target.slot_module(p)] for p in PROJECTIONS]
                wrapped_experts = MultiLoRAExperts(
                    layer.get_submodule(path), target, slots, index, self._context
                )
                replace_module(layer, path, wrapped_experts)
            group_shared_inputs(layer)

        self._cond = threading.Condition(threading.RLock())
        self.slots = SlotTable(num_slots, slot_policy)
        self.host = HostTier(host_budget_bytes, host_policy)
        self._references = References()
        self._staging: dict[str, Future[StagedAdapter]] = {}
        self._plans: dict[tuple[tuple[int, ...], int], BatchPlan] = {}
        self.counters = {
            "hits": 0,
            "misses": 0,
            "evictions": 0,
            "bytes_moved": 0,
            "attaches": 0,
            "detaches": 0,
            "released": 0,
            "slot_waits": 0,
        }
        #: Cumulative seconds spent fetching packs, staging them and copying them into slots.
        self.timings = {"fetch_s": 0.0, "stage_s": 0.0, "copy_s": 0.0}

        self._pin_host = self.device.type == "cuda"
        self._writer = SlotWriter(self.pool, self.device, attach_threads)
        self._reclaimer = SlotReclaimer(
            self.slots, self._writer, self._cond, self.counters, self._report
        )
        self._stager = PackStager(
            catalog,
            self.fit,
            self.dtype,
            pin_memory=self._pin_host,
            flat=self.pool.copier is not None,
            helper=self._writer.helper,
        )

        self._prefetcher = Prefetcher(self._stage_ref, workers=prefetch_workers)
        self._sink = catalog if isinstance(catalog, ResidencySink) else None
        self._reporter: ResidencyReporter | None = None
        if self._sink is not None:
            self._sink.register_engine(
                self.engine_id, self.base_id or "", num_slots, max_rank, host_budget_bytes
            )
            sink = self._sink
            self._reporter = ResidencyReporter(
                self._residency_snapshot,
                lambda gpu, host, tiers: sink.report_residency(
                    self.engine_id, gpu, host, tiers=tiers
                ),
            )

    # ------------------------------------------------------------------ public API

    @property
    def catalog(self) -> PackSource:
        """Where references resolve and packs are fetched from. Setting it moves both (the
        prefetcher and the stager follow); residency reports stay with the catalog the engine
        registered with at construction."""
        return self._catalog

    @catalog.setter
    def catalog(self, source: PackSource) -> None:
        with self._cond:
            self._catalog = source
            self._stager.source = source

    def attach(self, ref: str) -> Revision:
        """Resolve ``ref`` through the catalog now and make that revision resident.

        Binds ``ref`` to it (an alias reference; ``t/a`` is ``t/a@latest``), so later calls
        naming ``ref`` get it; when it was bound to another revision this is a hot swap (see
        the module docstring). An exact reference (``t/a@3``) binds nothing: it cannot move.

        Raises:
            InvalidReference, NotFound: from the catalog.
            IncompatibleAdapter: the adapter does not fit this base or this engine's slots.
            ResourceExhausted: every slot is busy or pinned.
            InvalidPack, DataLoss: the pack is malformed or corrupt.
        """
        parsed = self._parse(ref)
        revision = self.catalog.resolve(parsed)
        entry = self._load(revision)
        with self._cond:
            self.counters["attaches"] += 1
            self._bind(parsed, revision)
            self._unlease(entry)
        # No residency report here: ``_load`` already flagged a change, and a binding that
        # releases a slot flags its own.
        return revision

    def detach(self, ref: str) -> list[Revision]:
        """Stop serving an adapter: ``t/a`` detaches every revision of the name, ``t/a@3`` or
        ``t/a@serving`` the one revision it names. Bindings and pins on it go; its slot is
        zeroed and freed once no running call uses it. Returns the detached revisions.

        Raises:
            InvalidReference: ``ref`` cannot be parsed.
            NotFound: nothing attached matches ``ref``.
        """
        parsed = self._parse(ref)
        whole_name = "@" not in ref
        with self._cond:
            self._reclaimer.wait_for_clears()
            refs = self._references
            mine = [(k, r) for k, r in refs.bindings() if refs.adapter_of(k) == parsed.adapter]
            if whole_name:
                digests = {e.digest for e in self.slots if e.revision.adapter == parsed.adapter}
            else:
                known = self._known(parsed)
                if known is None:
                    raise NotFound(f"{ref} is not attached to engine {self.engine_id}")
                digests = {str(known.digest)}
                mine = [(k, r) for k, r in mine if str(r.digest) in digests]
            digests.update(str(r.digest) for _, r in mine)
            matched = [e for d in digests if (e := self.slots.get(d)) is not None]
            if not matched and not mine:
                raise NotFound(f"{ref} is not attached to engine {self.engine_id}")
            resident = [e.revision for e in self.slots]
            refs.pins = {
                k
                for k in refs.pins
                if refs.adapter_of(k) != parsed.adapter
                or not (whole_name or refs.pin_digest(k, resident) in digests)
            }
            for key, _ in mine:
                refs.unbind(key)
            self.counters["detaches"] += 1
            self._refresh_pins()
            # Identical bytes published under another name share the slot: keep it for them.
            for entry in matched:
                if not refs.is_bound(entry.digest):
                    entry.retired = True
                    self._reclaimer.release_if_done(entry)
            detached = [e.revision for e in matched]
        self._report()
        return detached

    def pin(self, ref: str) -> Revision:
        """Keep what ``ref`` names resident (attaching it if needed) until ``unpin``.

        A pin on an alias reference (``t/a``, ``t/a@serving``) follows its binding: after a hot
        swap the new revision is pinned and the old one released.

        Raises: as :meth:`attach`.
        """
        parsed = self._parse(ref)
        entry = self._lease_ref(parsed)
        with self._cond:
            self._references.pins.add(str(parsed))
            if parsed.selector is not Selector.ALIAS:
                self._references.remember_exact(str(parsed), entry.revision)
            self._refresh_pins()
            self._unlease(entry)
            return entry.revision

    def unpin(self, ref: str) -> None:
        """Remove a pin made with the same reference.

        Raises:
            NotFound: ``ref`` is not pinned.
        """
        key = str(self._parse(ref))
        with self._cond:
            if key not in self._references.pins:
                raise NotFound(f"{ref} is not pinned on engine {self.engine_id}")
            self._references.pins.discard(key)
            self._refresh_pins()
            for entry in list(self.slots):
                self._reclaimer.release_if_done(entry)

    def prefetch(self, refs: Sequence[str]) -> list[Future[Revision]]:
        """Resolve and stage ``refs`` in host memory on background threads (no slot is taken).

        Returns one future per reference; it raises what ``attach`` would (``NotFound``,
        ``IncompatibleAdapter``, ...).
        """
        for ref in refs:
            self._parse(ref)
        return self._prefetcher.submit(refs)

    def forward(
        self,
        input_ids: torch.Tensor,
        adapters: Sequence[str | None],
        **model_kwargs: Any,
    ) -> Any:
        """Run the model on a batch whose row ``i`` uses adapter ``adapters[i]`` (None: base).

        Adapters not resident are attached first. Extra keyword arguments go to the model
        (``attention_mask``, a KV cache under the model's own keyword, see
        :mod:`engine_plugin.model_cache`, ``use_cache``...). Returns the model's output
        (``.logits`` ``[rows, tokens, vocab]``).

        Raises:
            InvalidArgument: ``adapters`` does not have one entry per row.
            ResourceExhausted: the batch names more adapters than fit, or every slot is busy.
            Anything :meth:`attach` raises.
        """
        with self._batch(input_ids, adapters), torch.inference_mode():
            return self.model(input_ids=input_ids, **model_kwargs)

    def generate(
        self,
        input_ids: torch.Tensor,
        adapters: Sequence[str | None],
        max_new_tokens: int = 32,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy generation (unless ``generate_kwargs`` say otherwise), row ``i`` with adapter
        ``adapters[i]`` for every step. Returns ``[rows, prompt + new]`` token ids.

        The adapters stay leased for the whole call, so a hot swap during generation does not
        change the revision a running row uses.

        Raises: as :meth:`forward`.
        """
        kwargs: dict[str, Any] = {"do_sample": False, **generate_kwargs}
        if "attention_mask" not in kwargs:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        config = getattr(self.model, "generation_config", None)
        if "pad_token_id" not in kwargs and getattr(config, "pad_token_id", None) is None:
            eos = getattr(config, "eos_token_id", None)
            kwargs["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) or 0
        with self._batch(input_ids, adapters), torch.inference_mode():
            output = self.model.generate(  # type: ignore[operator]
                input_ids=input_ids, max_new_tokens=max_new_tokens, **kwargs
            )
        return output if isinstance(output, torch.Tensor) else output.sequences

    def stats(self) -> dict[str, Any]:
        """Counters and what is where: ``num_slots``, ``resident`` (each with its digest),
        ``hits``, ``misses``, ``evictions``, ``bytes_moved``, the host tier and prefetcher,
        and ``kept_stagings`` (fetches that reused a staging, see ``kept_stagings``)."""
        with self._cond:
            self._reclaimer.wait_for_clears()
            resident = [
                {
                    "ref": f"{e.revision.adapter}@{e.revision.number}",
                    "name": str(e.revision.adapter),
                    "revision": e.revision.number,
                    "digest": e.digest,
                    "slot": e.slot,
                    "rank": e.revision.rank,
                    "state": e.state.value,
                    "in_flight": e.leases,
                    "pinned": e.pinned,
                    "retired": e.retired,
                }
                for e in self.slots
            ]
            stats: dict[str, Any] = {
                "engine_id": self.engine_id,
                "base_id": self.base_id,
                "device": str(self.device),
                "num_slots": self.num_slots,
                "max_rank": self.max_rank,
                "free_slots": self.slots.free_slots,
                "slot_bytes": self.pool.nbytes,
                "resident": resident,
                "bindings": {
                    k: f"{r.adapter}@{r.number}" for k, r in sorted(self._references.bindings())
                },
                "pins": sorted(self._references.pins),
                **self.counters,
                "host": self.host.stats(),
                "prefetch": vars(self._prefetcher.counters).copy(),
                "kept_stagings": dict(self._stager.kept.counters),
                "time_s": dict(self.timings),
            }
        if self._reporter is not None:
            stats["residency_reports"] = {
                "sent": self._reporter.sent,
                "failed": self._reporter.failed,
                "last_error": self._reporter.last_error,
            }
        return stats

    def close(self) -> None:
        """Stop background threads (the model and its slots stay usable)."""
        self._prefetcher.close()
        if self._reporter is not None:
            self._reporter.close()
        self._writer.close()

    def __enter__(self) -> ResidentEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush_reports(self, timeout: float | None = 10.0) -> None:
        """Wait until the catalog has been told the current residency (tests, shutdown)."""
        if self._reporter is not None:
            self._reporter.flush(timeout)

    # ------------------------------------------------------------------ batches

    @contextlib.contextmanager
    def _batch(
        self, input_ids: torch.Tensor, adapters: Sequence[str | None]
    ) -> Iterator[BatchPlan]:
        rows = int(input_ids.shape[0])
        if len(adapters) != rows:
            raise InvalidArgument(
                f"adapters has {len(adapters)} entries but the batch has {rows} rows"
            )
        with self.leased_rows(adapters) as row_slots:
            plan = self._plan(row_slots)
            previous = self._context.plan
            self._context.plan = plan
            try:
                yield plan
            finally:
                self._context.plan = previous

    @contextlib.contextmanager
    def leased_rows(self, adapters: Sequence[str | None]) -> Iterator[tuple[int, ...]]:
        """Lease the slot of every adapter named (attaching what is not resident) and yield
        each row's slot (the zero slot for None); the slots stay put until the block ends.

        On CUDA the current stream first waits for every slot write issued so far.

        Raises:
            ResourceExhausted: more distinct adapters than slots, or every slot is busy.
            Anything :meth:`attach` raises.
        """
        distinct = list(dict.fromkeys(a for a in adapters if a is not None))
        if len(distinct) > self.num_slots:
            raise ResourceExhausted(
                f"the batch names {len(distinct)} adapters but engine {self.engine_id} has "
                f"{self.num_slots} slots; split the batch"
            )
        leases: dict[str, SlotEntry] = {}
        try:
            for ref in distinct:
                leases[ref] = self._lease_ref(self._parse(ref))
            self._writer.wait_for_writes()
            yield tuple(self.pool.zero_slot if a is None else leases[a].slot for a in adapters)
        finally:
            if leases:
                with self._cond:
                    for entry in leases.values():
                        self._unlease(entry)

    def _plan(self, row_slots: tuple[int, ...]) -> BatchPlan:
        key = (row_slots, self.pool.generation)
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_batch(self.pool, row_slots)
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------ references

    def _parse(self, ref: str) -> Ref:
        return self._references.parse(ref)

    def _known(self, ref: Ref) -> Revision | None:
        """The revision ``ref`` means on this engine without asking the catalog (lock held)."""
        return self._references.known(ref, (e.revision for e in self.slots))

    def _bind(self, ref: Ref, revision: Revision) -> None:
        """Point alias reference ``ref`` at ``revision`` (an exact one is remembered); retire
        revisions that thereby lose their last binding (lock held)."""
        displaced = self._references.bind(ref, revision, lambda: {e.digest for e in self.slots})
        self._refresh_pins()
        for digest in displaced:
            entry = self.slots.get(digest)
            if entry is not None:
                entry.retired = True
                self._reclaimer.release_if_done(entry, background=True)

    def _refresh_pins(self) -> None:
        pinned = self._references.pinned_digests(e.revision for e in self.slots)
        for entry in self.slots.entries():
            entry.pinned = entry.digest in pinned

    # ------------------------------------------------------------------ leases and loading

    def _lease_ref(self, ref: Ref) -> SlotEntry:
        """A lease on the slot holding what ``ref`` names, loading it first if needed."""
        revision: Revision | None = None
        with self._cond:
            while True:
                revision = self._known(ref)
                if revision is None:
                    break
                entry = self.slots.get(str(revision.digest))
                if entry is None:
                    break
                if entry.state is not SlotState.READY:  # being loaded or cleared
                    self._cond.wait()
                    continue
                self.slots.lease(entry)
                entry.retired = False
                self.counters["hits"] += 1
                return entry
        if revision is None:
            revision = self.catalog.resolve(ref)
        entry = self._load(revision)
        with self._cond:
            if ref.selector is Selector.ALIAS:
                if self._references.bound(str(ref)) is None:
                    self._bind(ref, revision)
            else:
                self._references.remember_exact(str(ref), revision)
        return entry

    def _load(self, revision: Revision) -> SlotEntry:
        """Make ``revision`` resident and return a lease on its slot."""
        self.fit.check_revision(revision)
        digest = str(revision.digest)
        deadline = time.monotonic() + self.slot_wait_s
        claimed: tuple[SlotEntry, SlotEntry | None] | None = None
        with self._cond:
            entry = self._lease_resident(digest)
            if entry is not None:
                return entry
            # The common case (staged in host memory, a slot to spare) claims under this one
            # lock hold: at rank 1 the whole attach is tens of microseconds.
            staged = self.host.get(digest) if self.host.peek(digest) is not None else None
            if staged is not None:
                with contextlib.suppress(SlotsExhausted):
                    claimed = self.slots.claim(revision)
        if claimed is None:
            if staged is None:
                staged = self._staged(revision, into_slot=True)
            with self._cond:
                while claimed is None:
                    entry = self._lease_resident(digest)
                    if entry is not None:
                        return entry
                    try:
                        claimed = self.slots.claim(revision)
                    except SlotsExhausted:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise
                        self.counters["slot_waits"] += 1
                        self._cond.wait(remaining)
        entry, evicted = claimed
        assert staged is not None  # both paths above stage before they claim
        # Counted under the next lock hold, whichever way the write goes.
        evictions = int(evicted is not None)
        started = time.perf_counter()
        try:
            moved = self._writer.write(entry.slot, staged, clear_first=evicted is not None)
        except BaseException:
            with self._cond:
                self.counters["evictions"] += evictions
                self._writer.clear(entry.slot)
                self.slots.release(entry)
                self._cond.notify_all()
            raise
        with self._cond:
            self.timings["copy_s"] += time.perf_counter() - started
            entry.state = SlotState.READY
            entry.nbytes = moved
            self.counters["evictions"] += evictions
            self.counters["misses"] += 1
            self.counters["bytes_moved"] += moved
            self._refresh_pins()
            self._cond.notify_all()
        self._report()
        return entry

    def _lease_resident(self, digest: str) -> SlotEntry | None:
        """Lease ``digest``'s slot if resident, waiting out a load in progress (lock held)."""
        while True:
            entry = self.slots.get(digest)
            if entry is None:
                return None
            if entry.state is SlotState.READY:
                self.slots.lease(entry)
                entry.retired = False
                self.counters["hits"] += 1
                return entry
            self._cond.wait()

    def _unlease(self, entry: SlotEntry) -> None:
        """End one lease (lock held); frees the slot if it was retired meanwhile."""
        self.slots.unlease(entry)
        self._writer.read_ended(entry.slot)
        self._reclaimer.release_if_done(entry)
        self._cond.notify_all()

    # ------------------------------------------------------------------ host tier

    def _stage_ref(self, ref: str) -> Revision:
        """Prefetch worker: resolve ``ref`` and stage its pack in host memory.

        Like ``attach``, an alias is resolved through the catalog now (not through this
        engine's bindings), so prefetching ahead of a hot swap stages the new revision.
        """
        parsed = self._parse(ref)
        revision = None
        if parsed.selector is not Selector.ALIAS:
            with self._cond:
                revision = self._known(parsed)
        if revision is None:
            revision = self.catalog.resolve(parsed)
        self.fit.check_revision(revision)
        self._staged(revision)
        return revision

    def _staged(self, revision: Revision, *, into_slot: bool = False) -> StagedAdapter:
        """The staged pack of ``revision``: from the host tier, or fetched, checked and staged
        by the ``PackStager`` (one fetch per digest however many callers ask at once).
        ``into_slot``: an attach waits for it, to copy it into a slot at once."""
        digest = str(revision.digest)
        with self._cond:
            staged = self.host.get(digest)
            if staged is not None:
                return staged
            future = self._staging.get(digest)
            owner = future is None
            if future is None:
                future = Future()
                self._staging[digest] = future
        if not owner:
            return future.result()
        try:
            staged, fetch_s, stage_s = self._stager.stage(revision, into_slot=into_slot)
        except BaseException as exc:
            with self._cond:
                del self._staging[digest]
            future.set_exception(exc)
            raise
        with self._cond:
            self.timings["fetch_s"] += fetch_s
            self.timings["stage_s"] += stage_s
            self.host.put(staged)
            del self._staging[digest]
        future.set_result(staged)
        self._report()
        return staged

    # ------------------------------------------------------------------ residency reports

    def _residency_snapshot(self) -> tuple[list[str], list[str], list[dict[str, Any]]]:
        """What the engine holds, and its counters per tier, as the catalog records them."""
        with self._cond:
            ready = [e for e in self.slots.entries() if e.state is SlotState.READY]
            host = self.host.stats()
            tiers = [
                {
                    "tier": "host",
                    **{k: v for k, v in host.items() if k != "budget_bytes"},
                    "capacity_bytes": host["budget_bytes"],
                },
                {
                    "tier": "gpu",
                    "bytes": sum(e.nbytes for e in ready),
                    "entries": len(ready),
                    "hits": self.counters["hits"],
                    "misses": self.counters["misses"],
                    "evictions": self.counters["evictions"],
                    "capacity_bytes": self.pool.nbytes,
                    "bytes_in": self.counters["bytes_moved"],
                },
            ]
            return [e.digest for e in ready], self.host.digests(), tiers

    def _report(self) -> None:
        if self._reporter is not None:
            self._reporter.changed()
