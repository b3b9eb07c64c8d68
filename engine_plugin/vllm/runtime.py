"""The plugin's state inside one vLLM server: which names vLLM holds, hot swap, warming, reports.

One ``LoracatRuntime`` per vLLM API server process (no vLLM imports here; ``resolver.py`` is the
thin vLLM face). It keeps a table of the names vLLM has registered through loracat and the
revision each one serves, and one background thread (the checker) that

* re-resolves every mutable name (``t/n``, ``t/n@serving``) every ``recheck_s`` and at once when
  the catalog's hint stream says an alias moved, and swaps a name whose revision changed: the
  new revision is materialized first, then the name is dropped from vLLM's table, so the next
  request for it goes through the resolver again; requests already running keep the revision
  they started with;
* warms what the catalog hints at (``stage`` hints): materializes it on node-local disk and
  loads it into vLLM's LoRA cache under its reference, at most ``max_cpu_loras`` at a time;
* keeps the table true to vLLM's (``/v1/models``) and reports residency to the catalog.

vLLM keeps a ``LoRARequest`` per name and compares two of them by ``lora_name`` only, so two
revisions of one mutable name in one batch (one still running, one new) would be taken for one
adapter. Each revision of a mutable name is therefore registered under its own ``lora_name``
(``t/n@serving#3``); an immutable name never changes revision and keeps its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.errors import CatalogError, NotFound, Unavailable
from catalog.model import AdapterName, Ref, Revision
from engine_plugin.hints import HintFollower
from engine_plugin.prefetch import ResidencyReporter
from engine_plugin.vllm.adapters import (
    AdapterCatalog,
    CatalogAdapters,
    Materialized,
    is_mutable,
    served_base_identity,
)
from engine_plugin.vllm.admin import VllmAdmin
from engine_plugin.vllm.node_cache import PeftDirCache
from engine_plugin.vllm.settings import PluginSettings

log = logging.getLogger(__name__)

#: A name vLLM does not list this long after it was bound was dropped (or failed to load).
STALE_AFTER_S = 30.0
#: How long a resolve waits for the catalog's channel to reconnect before answering 503: two of
#: the channel's longest reconnect backoffs (``catalog.client.requests``), with their jitter.
RECONNECT_WAIT_S = 2.5
#: How long residency reports wait after a change (see ``start``).
REPORT_DEBOUNCE_S = 1.0


@dataclass(frozen=True)
class Binding:
    """A name registered in vLLM and the revision it serves."""

    materialized: Materialized
    lora_name: str  # the LoRARequest's name in vLLM
    bound_at: float

    @property
    def name(self) -> str:
        return self.materialized.name

    @property
    def revision(self) -> Revision:
        return self.materialized.revision

    @property
    def ref(self) -> Ref:
        return self.materialized.ref

    @property
    def path(self) -> Path:
        return self.materialized.path


def lora_name_for(name: str, ref: Ref, revision: Revision) -> str:
    """The ``lora_name`` vLLM gets for ``name``: itself when immutable, else with the revision
    number appended, so two revisions of one name are two adapters to vLLM."""
    return f"{name}#{revision.number}" if is_mutable(ref) else name


class LoracatRuntime:
    """The plugin's state in one vLLM server process (see the module docstring).

    Args:
        settings: the plugin's settings.
        catalog: a catalog client (``CatalogClient(settings.server)`` when omitted).
        admin: vLLM's admin API (``VllmAdmin(settings.vllm_url)`` when omitted).
        start: start the checker thread, the hint follower and the residency reports.
    """

    def __init__(
        self,
        settings: PluginSettings,
        *,
        catalog: AdapterCatalog | None = None,
        admin: VllmAdmin | None = None,
        start: bool = True,
    ) -> None:
        self.settings = settings
        if catalog is None:
            from catalog.client import CatalogClient

            catalog = CatalogClient(settings.server, timeout=10.0)
        self.catalog: Any = catalog
        self.cache = PeftDirCache(
            settings.cache_dir,
            budget_bytes=settings.cache_bytes,
            policy=settings.cache_policy,
            fsync=settings.cache_fsync,
            defer_eviction=True,  # the checker keeps the budget, off the resolve path
        )
        served = served_base_identity(settings.model or "", settings.base_id)
        self.adapters = CatalogAdapters(
            catalog,
            self.cache,
            served,
            max_rank=settings.max_lora_rank,
            server_export=settings.server_export,
        )
        self.admin = admin or VllmAdmin(settings.vllm_url, api_key=settings.api_key)
        self.engine_id = settings.engine_id
        self.counters = {"swaps": 0, "warmed": 0, "dropped": 0, "recheck_errors": 0}
        self._lock = threading.Lock()
        self._bindings: dict[str, Binding] = {}
        self._releases: deque[tuple[float, Materialized]] = deque()
        self._warm: deque[str] = deque()
        self._urgent: set[AdapterName] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._registered = False
        self._refused_seen = 0
        self._follower: HintFollower | None = None
        self._reporter: ResidencyReporter | None = None
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Register with the catalog (retried by the checker while it is down), follow its
        hints, report residency, and start the checker."""
        self._register()
        if hasattr(self.catalog, "watch_hints"):
            self._follower = HintFollower(self, self.catalog)
        if hasattr(self.catalog, "report_residency"):
            # Reports wait a second after a change: a snapshot lists the node cache (a few
            # file reads per directory) in vLLM's process, where it would compete with the
            # adapter load that follows a resolve; the catalog's view need not be faster.
            self._reporter = ResidencyReporter(
                self._residency_snapshot, self._send_residency, debounce_s=REPORT_DEBOUNCE_S
            )
        self._thread = threading.Thread(target=self._run, name="loracat-vllm", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._follower is not None:
            self._follower.close()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._reporter is not None:
            self._reporter.close()
        self.cache.close()

    def settle_base(self, model: str) -> None:
        """Take the model path vLLM passes as the served base, unless one is declared already
        (``LORACAT_BASE_ID``, or the ``--model`` flag this process was started with)."""
        if not self.adapters.served_base:
            self.adapters.served_base = served_base_identity(model, self.settings.base_id)
            self._registered = False  # the checker registers again, now with the base

    # -- the resolver's side -----------------------------------------------------------------

    def resolve(self, name: str) -> Binding:
        """Resolve ``name`` for vLLM, materialize it and record it as registered; vLLM calls
        this (through the resolver) the first time a request names it.

        Raises what ``CatalogAdapters.load`` raises: ``InvalidReference``, ``NotFound``,
        ``IncompatibleAdapter``, ``Unavailable``, ``DeadlineExceeded``, ``DataLoss``.
        """
        try:
            materialized = self.adapters.load(name)
        except Unavailable:
            # After an outage gRPC waits out a reconnect backoff before trying again, failing
            # calls fast meanwhile; a catalog that is back should answer this request, not the
            # next one, so ask the channel to connect now and try once more.
            wait_ready = getattr(self.catalog, "wait_ready", None)
            if wait_ready is None:
                raise
            wait_ready(timeout=RECONNECT_WAIT_S)
            materialized = self.adapters.load(name)
        binding = Binding(
            materialized,
            lora_name_for(name, materialized.ref, materialized.revision),
            time.monotonic(),
        )
        self._bind(binding)
        return binding

    def bindings(self) -> dict[str, Binding]:
        with self._lock:
            return dict(self._bindings)

    def _bind(self, binding: Binding) -> None:
        with self._lock:
            previous = self._bindings.get(binding.name)
            self._bindings[binding.name] = binding
            if previous is not None:
                # Requests started on the previous revision may still need its directory.
                self._releases.append(
                    (time.monotonic() + self.settings.release_grace_s, previous.materialized)
                )
        if self._reporter is not None:
            self._reporter.changed()

    # -- hints (engine_plugin.hints.HintTarget) ----------------------------------------------

    def attach(self, ref: str) -> None:
        """An alias of ``ref``'s adapter moved (a deployment wave): re-check that adapter's
        names now instead of at the next tick, and warm the revision it moved to."""
        adapter = Ref.parse(ref).adapter
        with self._lock:
            self._urgent.add(adapter)
        self.prefetch([ref])
        self._wake.set()

    def prefetch(self, refs: list[str]) -> None:
        """Warm ``refs`` (``stage`` hints): node-local disk, then vLLM's LoRA cache."""
        if not self.settings.warm:
            return
        with self._lock:
            for ref in refs:
                Ref.parse(ref)
                if ref not in self._warm:
                    self._warm.append(ref)
        self._wake.set()

    # -- the checker -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.recheck_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_once()
            except Exception:  # the checker must outlive any one failure
                log.exception("loracat vLLM checker pass failed")

    def check_once(self) -> None:
        """One pass of the checker (the thread runs it every ``recheck_s``; tests call it)."""
        self.cache.evict_if_due()
        self._keep_registered()
        with self._lock:
            urgent, self._urgent = self._urgent, set()
        if urgent:
            # A deployment wave: its names first, before any bookkeeping call.
            self._recheck_mutable(urgent)
        if not self.admin.healthy():
            return  # vLLM is not serving yet (or any more): nothing to swap or warm
        self._drop_unregistered()
        self._recheck_mutable()
        self._warm_hinted()
        self._release_due()

    def _keep_registered(self) -> None:
        refused = self._follower.counters["refused"] if self._follower is not None else 0
        if self._registered and refused == self._refused_seen:
            return
        self._refused_seen = refused
        self._registered = False
        self._register()

    def _register(self) -> None:
        if not hasattr(self.catalog, "register_engine"):
            return
        try:
            self.catalog.register_engine(
                self.engine_id,
                self.adapters.served_base,
                self.settings.max_loras,
                self.settings.max_lora_rank,
                self.settings.cache_bytes,
            )
        except CatalogError as exc:
            log.warning("registering %s with the catalog failed: %s", self.engine_id, exc)
            return
        self._registered = True
        if self._reporter is not None:
            self._reporter.changed()

    def _drop_unregistered(self) -> None:
        """Forget names vLLM no longer lists (unloaded by hand, or their load failed)."""
        present = set(self.admin.loaded())
        now = time.monotonic()
        with self._lock:
            gone = [
                b
                for b in self._bindings.values()
                if b.lora_name not in present and now - b.bound_at > STALE_AFTER_S
            ]
            for binding in gone:
                del self._bindings[binding.name]
                self._releases.append((now + self.settings.release_grace_s, binding.materialized))
        if gone:
            self.counters["dropped"] += len(gone)
            if self._reporter is not None:
                self._reporter.changed()

    def _recheck_mutable(self, only: set[AdapterName] | None = None) -> None:
        with self._lock:
            mutable = [
                b
                for b in self._bindings.values()
                if is_mutable(b.ref) and (only is None or b.ref.adapter in only)
            ]
        for binding in mutable:
            try:
                revision = self.catalog.resolve(binding.ref)
            except NotFound:
                revision = None
            except CatalogError as exc:  # the catalog is down: keep serving what is loaded
                self.counters["recheck_errors"] += 1
                log.info("re-resolving %s failed: %s", binding.name, exc)
                continue
            if revision is not None and revision.digest == binding.revision.digest:
                continue
            self._swap(binding)

    def _swap(self, binding: Binding) -> None:
        """Point ``binding.name`` at what it names now (or at nothing: then the next request
        gets the catalog's answer, a 404 or a 400, from the resolver).

        The new revision is fetched to node-local disk first, while the old one still serves
        the name; then the name is dropped from vLLM's table, and the next request for it goes
        through the resolver (a Resolve, a directory already on disk, vLLM's load from it).
        """
        staged: Materialized | None = None
        try:
            staged = self.adapters.load(binding.name)
        except CatalogError as exc:
            log.info("%s no longer resolves to a servable revision: %s", binding.name, exc)
        try:
            self.admin.unload(binding.name)
            with self._lock:
                if self._bindings.get(binding.name) is binding:
                    del self._bindings[binding.name]
                    self._releases.append(
                        (time.monotonic() + self.settings.release_grace_s, binding.materialized)
                    )
            self.counters["swaps"] += 1
        except CatalogError as exc:
            log.warning("swapping %s failed: %s", binding.name, exc)
        finally:
            if staged is not None:
                # Held only across the unload: the resolver takes its own hold.
                self.adapters.release(staged)
            if self._reporter is not None:
                self._reporter.changed()

    def _warm_hinted(self) -> None:
        budget = max(1, self.settings.max_cpu_loras)
        warmed = 0
        while warmed < budget:
            with self._lock:
                if not self._warm:
                    return
                ref = self._warm.popleft()
                if ref in self._bindings:
                    continue
            try:
                materialized = self.adapters.load(ref)
            except CatalogError as exc:
                log.info("warming %s skipped: %s", ref, exc)
                continue
            lora_name = lora_name_for(ref, materialized.ref, materialized.revision)
            try:
                self.admin.load(lora_name, str(materialized.path))
            except CatalogError as exc:  # e.g. a request registered it meanwhile
                log.info("warming %s: vLLM said %s", ref, exc)
                self.adapters.release(materialized)
                continue
            self._bind(Binding(materialized, lora_name, time.monotonic()))
            self.counters["warmed"] += 1
            warmed += 1

    def _release_due(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            while self._releases and self._releases[0][0] <= now:
                due.append(self._releases.popleft()[1])
        for materialized in due:
            self.adapters.release(materialized)
        if due and self._reporter is not None:
            self._reporter.changed()

    # -- residency ---------------------------------------------------------------------------

    def _residency_snapshot(self) -> tuple[list[str], list[str], list[dict[str, Any]]]:
        """Loaded in vLLM is reported as the engine's ``gpu`` tier (vLLM's LoRA cache); the
        node-local directories as its ``host`` tier (the node's copy outside the engine)."""
        with self._lock:
            loaded = {
                str(b.revision.digest): b.revision.size_bytes for b in self._bindings.values()
            }
        entries = self.cache.entries()
        counters = self.cache.counters
        tiers = [
            {
                "tier": "host",
                "bytes": sum(e.size_bytes for e in entries),
                "entries": len(entries),
                "hits": counters.hits + counters.waits,
                "misses": counters.misses,
                "evictions": counters.evictions,
                "bytes_in": counters.bytes_in,
                "capacity_bytes": self.settings.cache_bytes,
            },
            {"tier": "gpu", "bytes": sum(loaded.values()), "entries": len(loaded)},
        ]
        host = [e.key.replace("-", ":", 1) for e in entries]
        return sorted(loaded), host, tiers

    def _send_residency(self, gpu: list[str], host: list[str], tiers: list[dict[str, Any]]) -> None:
        if not self._registered:
            return
        self.catalog.report_residency(self.engine_id, gpu, host, tiers=tiers)

    def flush_reports(self, timeout: float = 10.0) -> None:
        if self._reporter is not None:
            self._reporter.flush(timeout)


class RuntimeStarter:
    """Builds the process's ``LoracatRuntime`` once vLLM's HTTP server answers (``eager``; or
    at the first resolve, whichever comes first).

    Not at plugin registration: vLLM starts its engine-core processes after loading plugins, by
    ``fork`` on some platforms, and a gRPC channel must not be open across a fork. The waiting
    thread uses only ``urllib`` until then.
    """

    def __init__(
        self, settings: PluginSettings, *, eager: bool = True, poll_s: float = 0.5
    ) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._runtime: LoracatRuntime | None = None
        self._poll_s = poll_s
        if eager:
            threading.Thread(target=self._wait, name="loracat-vllm-start", daemon=True).start()

    def get(self) -> LoracatRuntime:
        with self._lock:
            if self._runtime is None:
                self._runtime = LoracatRuntime(self.settings)
            return self._runtime

    def _wait(self) -> None:
        admin = VllmAdmin(self.settings.vllm_url, api_key=self.settings.api_key)
        while self._runtime is None:
            if admin.healthy():
                self.get()
                return
            time.sleep(self._poll_s)
