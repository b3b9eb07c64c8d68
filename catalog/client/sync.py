"""The synchronous catalog client.

Every method returns catalog model types and raises ``CatalogError`` subclasses (never a raw
``grpc.RpcError``); every call carries a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.client import answers, requests
from catalog.client.channel import channel_settings, open_channel
from catalog.client.colocated import ColocatedPath
from catalog.client.errors import not_ready, translated
from catalog.client.local_push import InboxPush
from catalog.client.parallel_fetch import parallel_fetch
from catalog.client.requests import (
    DEFAULT_TIMEOUT,
    TRANSFER_TIMEOUT,
    PackSource,
    ProgressCallback,
    PushOptions,
    PushResult,
    ref_text,
)
from catalog.client.transfer import PackReceiver, fetch_request, raw_fetch_pack, write_pack_file
from catalog.convert import move_from_pb, revision_from_pb
from catalog.model import (
    AdapterName,
    AdapterSummary,
    AliasMove,
    Hint,
    Page,
    PrefetchProgress,
    PushProvenance,
    Ref,
    Revision,
    every_item,
)
from catalog.pack import PackPlan

__all__ = ["DEFAULT_TIMEOUT", "TRANSFER_TIMEOUT", "CatalogClient", "HintStream"]

T = TypeVar("T")


class HintStream:
    """A server stream of hints that another thread can cancel."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target

    def __iter__(self) -> Iterator[Hint]:
        with translated(self._target):
            for hint in self._call:
                yield answers.hint_from_pb(hint)

    def cancel(self) -> None:
        self._call.cancel()


def _leased_ref(ref: Ref | Revision | str) -> str:
    """The reference a lease names: a revision by its digest, so the bytes leased are the
    ones the caller resolved."""
    if isinstance(ref, Revision):
        return requests.pinned_ref(ref)
    return ref_text(ref)


class CatalogClient:
    """A connection to a loracat catalog server, e.g. ``CatalogClient("127.0.0.1:7070")``."""

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        colocated: bool = True,
    ) -> None:
        """Connect to ``target`` (``host``, ``host:port``, ``grpc://`` or ``grpcs://`` for TLS;
        None: ``$LORACAT_SERVER``, else ``127.0.0.1:7070``, as the CLI does). ``token`` is
        sent as ``authorization: Bearer <token>``; ``tls_ca`` verifies the server, ``tls_cert``
        and ``tls_key`` answer a server that asks for mutual TLS (each falls back to its
        ``$LORACAT_*`` variable, see ``catalog.client.channel``). Raises ``InvalidArgument``.

        Whole-pack fetches read the catalog's NVMe tier directly when this process can (same
        host, its environment readable here; see ``catalog.client.colocated``), with gRPC for
        control only; ``colocated=False`` always streams the bytes over gRPC."""
        settings = channel_settings(
            target, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self.target = settings.address
        self.timeout = timeout
        self._channel = open_channel(settings)
        self._stub = pb_grpc.CatalogStub(self._channel)
        # FetchPack's messages arrive undecoded (see catalog.client.transfer).
        self._fetch_pack = raw_fetch_pack(self._channel)
        #: The colocated read path (``None``: disabled); decides on the first fetch.
        self.colocated = (
            ColocatedPath(self._stub, self.target, timeout=timeout) if colocated else None
        )
        #: Pushes through the catalog's inbox on its host (``None``: always the stream).
        self._inbox = InboxPush(self._stub, timeout=timeout) if colocated else None

    @property
    def push_inbox(self) -> InboxPush | None:
        """The colocated push path (``None`` with ``colocated=False``): why pushes stream
        (``reason``), ``counters`` and ``timings``."""
        return self._inbox

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        """``method(request)`` of the stub under a deadline (``timeout``, else the client's),
        its RPC error raised as the catalog's exception."""
        with translated(self.target):
            return method(request, timeout=self.timeout if timeout is None else timeout)

    # -- revisions --------------------------------------------------------------------------

    def push(
        self,
        name: AdapterName | str,
        pack: PackSource,
        *,
        base_id: str = "",
        aliases: list[str] | tuple[str, ...] = (),
        metadata: dict[str, str] | None = None,
        provenance: PushProvenance | None = None,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> PushResult:
        """Push pack bytes (or a pack file) as a new revision of ``name``.

        The digest is computed locally first and sent ahead, so a corrupted transfer is refused.
        ``provenance`` (run id, parent, data digest, eval results; host defaults to this
        machine) is kept on the revision as ``provenance.*``/``eval.*`` metadata.
        Raises ``InvalidPack``, ``InvalidName``, ``InvalidArgument`` (``base_id`` differs from
        the pack's), ``NotFound`` (provenance parent), ``ResourceExhausted``, ``Conflict``.

        On the catalog's host (unless ``colocated=False``) the pack is written into the
        catalog's push inbox instead and named in one RPC (``catalog.client.local_push``).
        """
        options = (base_id, aliases, metadata, provenance)
        pushed = self._push_through_inbox(name, pack, options, progress, timeout)
        if pushed is not None:
            return pushed
        return self._push_stream(name, pack, options, progress, timeout)

    def push_peft_dir(
        self,
        name: AdapterName | str,
        directory: str | Path,
        *,
        base_id: str = "",
        aliases: list[str] | tuple[str, ...] = (),
        metadata: dict[str, str] | None = None,
        provenance: PushProvenance | None = None,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> PushResult:
        """Import the PEFT adapter ``directory`` and push it as a new revision of ``name``: a
        trainer's "PEFT dir -> pack -> push" in one call. ``base_id`` is as for
        ``catalog.pack.import_peft_dir`` (the config's ``base_model_name_or_path`` when
        empty); the other options as :meth:`push`.

        On the catalog's host the pack is laid out (``catalog.pack.plan_peft_dir``) and
        written straight into the catalog's push inbox, each byte of the adapter moved once
        from its mapped file into the inbox file's mapping, with no pack in this process's
        memory; otherwise it is imported and streamed as :meth:`push` does.
        Raises ``InvalidPack`` (what import refuses, before any RPC), then as :meth:`push`.
        """
        from catalog.pack import plan_peft_dir

        plan = plan_peft_dir(directory, base_id=base_id or None)
        options = (base_id, aliases, metadata, provenance)
        pushed = self._push_through_inbox(name, plan, options, progress, timeout)
        if pushed is not None:
            return pushed
        return self._push_stream(name, plan.tobytes(), options, progress, timeout)

    def _push_through_inbox(
        self,
        name: AdapterName | str,
        pack: PackSource | PackPlan,
        options: PushOptions,
        progress: ProgressCallback | None,
        timeout: float,
    ) -> PushResult | None:
        """The push through the catalog's inbox; ``None``: stream it instead."""
        if self._inbox is None:
            return None
        if isinstance(pack, PackPlan):
            size = pack.nbytes
        else:
            size = pack.stat().st_size if isinstance(pack, Path) else len(pack)
        header = requests.push_header(name, size, None, *options)
        with translated(self.target):
            pushed = self._inbox.push(pack, header, timeout)
        if pushed is None:
            return None
        if progress:
            progress(size, size)
        return answers.push_result(pushed)

    def _push_stream(
        self,
        name: AdapterName | str,
        pack: PackSource,
        options: PushOptions,
        progress: ProgressCallback | None,
        timeout: float,
    ) -> PushResult:
        """The push over the gRPC byte stream, its digest stated ahead."""
        header = requests.streamed_push_header(name, pack, options)
        pushing = requests.push_requests(pack, header, progress=progress)
        return answers.push_result(self._call(self._stub.Push, pushing, timeout))

    def resolve(self, ref: Ref | str) -> Revision:
        """The live revision ``ref`` names. Raises ``InvalidReference``, ``NotFound``."""
        request = pb.ResolveRequest(ref=ref_text(ref))
        return revision_from_pb(self._call(self._stub.Resolve, request))

    def list_adapters(
        self,
        prefix: str = "",
        *,
        page_size: int = 100,
        page_token: str = "",
        base_id: str = "",
        tags: dict[str, str] | None = None,
        alias: str = "",
    ) -> Page[AdapterSummary]:
        """A page of adapters under ``prefix`` (``""``, ``tenant`` or ``tenant/name``), kept to
        those whose latest revision has ``base_id`` and every ``tags`` metadata entry and that
        have ``alias`` set, answered by the server's index. A filtered page may be short (even
        empty) and still have a ``next_token``. Raises ``InvalidName``, ``InvalidArgument``."""
        request = requests.list_adapters_request(
            prefix, page_size, page_token, base_id, tags, alias
        )
        return answers.adapters_page(self._call(self._stub.ListAdapters, request))

    def iter_adapters(
        self, prefix: str = "", *, page_size: int = 1000, **filters: Any
    ) -> Iterator[AdapterSummary]:
        """Every adapter under ``prefix`` passing ``filters`` (as :meth:`list_adapters`),
        fetching pages as the iteration goes."""
        return every_item(
            lambda token: self.list_adapters(
                prefix, page_size=page_size, page_token=token, **filters
            )
        )

    def list_revisions(
        self, name: AdapterName | str, *, page_size: int = 100, page_token: str = ""
    ) -> Page[Revision]:
        request = requests.list_revisions_request(name, page_size, page_token)
        return answers.revisions_page(self._call(self._stub.ListRevisions, request))

    def iter_revisions(
        self, name: AdapterName | str, *, page_size: int = 1000
    ) -> Iterator[Revision]:
        """Every live revision of ``name``, fetching pages as the iteration goes."""
        return every_item(
            lambda token: self.list_revisions(name, page_size=page_size, page_token=token)
        )

    # -- aliases ----------------------------------------------------------------------------

    def set_alias(
        self,
        name: AdapterName | str,
        alias: str,
        revision: int | str,
        *,
        expected: int | None = None,
    ) -> AliasMove:
        """Move ``alias`` to ``revision`` (0 removes it) if it points at ``expected`` now.
        ``revision`` may also name the revision as text: ``"3"``, an alias (``"canary"``) or a
        digest (prefix), resolved by the server under the same lock as the move.

        Raises ``Conflict`` when it does not (a lost compare-and-swap), ``NotFound``.
        """
        request = requests.alias_request(name, alias, revision, expected)
        return move_from_pb(self._call(self._stub.SetAlias, request))

    def rollback(
        self,
        name: AdapterName | str,
        alias: str,
        *,
        expected: int | None = None,
        to: int | str = "",
    ) -> AliasMove:
        """Move ``alias`` back one step of its history (repeated calls keep walking back), or
        to ``to`` (a number, alias or digest). Raises ``FailedPrecondition`` (nothing earlier,
        or it was deleted), ``Conflict`` (moved meanwhile), ``NotFound``."""
        request = requests.rollback_request(name, alias, expected, to)
        return move_from_pb(self._call(self._stub.Rollback, request))

    def alias_history(self, name: AdapterName | str, alias: str = "") -> list[AliasMove]:
        request = pb.AliasHistoryRequest(name=requests.adapter_text(name), alias=alias)
        return answers.alias_moves(self._call(self._stub.AliasHistory, request))

    def set_metadata(
        self,
        ref: Ref | str,
        metadata: dict[str, str] | None = None,
        *,
        remove: list[str] | tuple[str, ...] = (),
    ) -> Revision:
        """Merge ``metadata`` (eval results, ``description``, tags) into a revision's, then drop
        the keys in ``remove``. Raises ``NotFound``, ``InvalidArgument`` (``provenance.*`` keys
        are the catalog's own, limits)."""
        request = requests.set_metadata_request(ref, metadata, remove)
        return revision_from_pb(self._call(self._stub.SetMetadata, request))

    def delete(
        self, ref: Ref | str, *, all_revisions: bool = False, force: bool = False
    ) -> list[int]:
        """Delete a revision (or every revision of the adapter); returns the deleted numbers.

        Raises ``FailedPrecondition`` when an alias points at a revision to delete, unless
        ``all_revisions`` and ``force`` (which remove the aliases first); ``NotFound``."""
        request = pb.DeleteRequest(ref=ref_text(ref), all_revisions=all_revisions, force=force)
        return list(self._call(self._stub.Delete, request).deleted)

    def purge(self, name: AdapterName | str) -> int:
        """Forget a name all of whose revisions are deleted (its aliases and alias history
        go; a later push starts again at revision 1); returns how many revisions it had held.

        Raises ``FailedPrecondition`` naming the live revisions while any remain (delete them
        with ``delete(name, all_revisions=True)`` first), ``NotFound``, ``InvalidName``."""
        request = pb.PurgeRequest(name=requests.adapter_text(name))
        return int(self._call(self._stub.Purge, request).revisions)

    # -- packs ------------------------------------------------------------------------------

    def fetch(
        self,
        ref: Ref | Revision | str,
        *,
        offset: int = 0,
        length: int = 0,
        verify: bool = True,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> memoryview:
        """The pack bytes of ``ref`` (or a range of them), as a read-only view that nothing
        else references (``bytes(...)`` it for a ``bytes``). A whole pack is checked against
        its digest as it arrives.

        Raises ``NotFound``, ``InvalidReference``, ``InvalidArgument`` (a range past the end),
        ``DataLoss`` (bytes that do not match the digest, or a malformed stream).
        """
        return self.fetch_with_revision(
            ref, offset=offset, length=length, verify=verify, progress=progress, timeout=timeout
        )[1]

    def fetch_with_revision(
        self,
        ref: Ref | Revision | str,
        *,
        offset: int = 0,
        length: int = 0,
        verify: bool = True,
        progress: ProgressCallback | None = None,
        timeout: float = TRANSFER_TIMEOUT,
        parallel: int = 1,
    ) -> tuple[Revision, memoryview]:
        """Like :meth:`fetch`, also returning the revision the server resolved.

        ``parallel`` > 1 fetches a whole pack as that many byte ranges on concurrent streams,
        each written straight into its place in the one buffer (for large packs over a real
        network; on loopback one stream is as fast). The ranges name the revision by its
        digest, so an alias that moves mid-fetch cannot mix two revisions.
        A whole pack comes from the NVMe tier directly when the client is colocated (the
        returned view then is a private copy, every chunk checked against its checksum).
        """
        requests.check_range(offset, length)
        if self.colocated is not None and offset == 0 and length == 0:
            known = ref if isinstance(ref, Revision) else None
            read = self.colocated.fetch(_leased_ref(ref), known)
            if read is not None:
                if progress:
                    progress(read[0].size_bytes, read[0].size_bytes)
                return read[0], read[1]
        if parallel > 1 and offset == 0 and length == 0:
            return self._fetch_parallel(ref, parallel, verify, progress, timeout)
        return self._fetch_stream(
            PackReceiver(ref_text(ref), offset, length, verify=verify), progress, timeout
        )

    def fetch_checked(self, revision: Revision) -> tuple[memoryview, bool]:
        """``revision``'s whole pack as :meth:`fetch` returns it, and whether the catalog
        vouches that its values are all finite: ``True`` only for a colocated read of an NVMe
        tier entry whose meta records the check (``catalog.cache.layout``,
        ``FLAG_VALUES_FINITE``), every chunk of it having matched its checksum. An engine
        may then skip its own finite check of the tensors it stages unconverted.

        Raises:
            As :meth:`fetch`.
        """
        if self.colocated is not None:
            read = self.colocated.fetch(_leased_ref(revision), revision)
            if read is not None:
                return read[1], read[2]
        return self.fetch(revision), False

    def _fetch_stream(
        self, receiver: PackReceiver, progress: ProgressCallback | None, timeout: float
    ) -> tuple[Revision, memoryview]:
        with translated(self.target):
            for raw in self._fetch_pack(fetch_request(receiver), timeout=timeout):
                receiver.add(raw)
                if progress:
                    progress(receiver.received, receiver.expected)
        return receiver.result()

    def _fetch_parallel(
        self,
        ref: Ref | Revision | str,
        parallel: int,
        verify: bool,
        progress: ProgressCallback | None,
        timeout: float,
    ) -> tuple[Revision, memoryview]:
        revision = ref if isinstance(ref, Revision) else self.resolve(ref)
        ranges = parallel_fetch(revision, parallel, verify=verify)
        if ranges is None:
            whole = PackReceiver(requests.pinned_ref(revision), 0, 0, verify=verify)
            return self._fetch_stream(whole, progress, timeout)
        lock = threading.Lock()

        def fetch_range(receiver: PackReceiver) -> None:
            self._fetch_stream(receiver, None, timeout)
            with lock:
                ranges.landed(receiver, progress)

        with ThreadPoolExecutor(parallel, thread_name_prefix="loracat-fetch") as pool:
            list(pool.map(fetch_range, ranges.receivers()))
        return ranges.result()

    def fetch_to(self, ref: Ref | Revision | str, dest: Path, **options: Any) -> Revision:
        """Write the verified pack to ``dest`` (via a temporary name, renamed into place)."""
        revision, data = self.fetch_with_revision(ref, **options)
        write_pack_file(dest, data)
        return revision

    # -- administration ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Catalog counts, per-tier occupancy and traffic, and counters."""
        return answers.stats_doc(self._call(self._stub.Stats, pb.StatsRequest()))

    def gc(self, *, dry_run: bool = False, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """Delete pack blobs no live revision references (``dry_run``: only report them)."""
        request = pb.GarbageCollectRequest(dry_run=dry_run)
        return answers.gc_doc(self._call(self._stub.GarbageCollect, request, timeout), dry_run)

    def verify(self, *, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """Check every log event and referenced blob; ``problems`` lists what is wrong."""
        return answers.verify_doc(self._call(self._stub.Verify, pb.VerifyRequest(), timeout))

    def reindex(self, *, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """Rebuild the server's index from the durable store and swap it in."""
        return answers.reindex_doc(self._call(self._stub.Reindex, pb.ReindexRequest(), timeout))

    def checkpoint(self, *, keep: int = 0, timeout: float = TRANSFER_TIMEOUT) -> dict[str, Any]:
        """Fold the durable log into a checkpoint (``keep``: how many to keep; 0 = default)."""
        request = pb.CheckpointRequest(keep=keep)
        return answers.checkpoint_doc(self._call(self._stub.Checkpoint, request, timeout))

    # -- the NVMe tier -----------------------------------------------------------------------

    def prefetch(
        self,
        refs: list[str],
        *,
        priority: int = 0,
        deadline_s: float = 0.0,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> Iterator[PrefetchProgress]:
        """Warm the server's NVMe tier; yields one progress record per reference as it ends."""
        request = requests.prefetch_request(refs, priority, deadline_s)
        with translated(self.target):
            for item in self._stub.Prefetch(request, timeout=timeout):
                yield answers.prefetch_progress(item)

    def pin_pack(self, ref: Ref | str) -> Revision:
        """Load ``ref``'s pack into the NVMe tier and keep it there until unpinned."""
        request = requests.pack_ref_request(ref)
        return revision_from_pb(self._call(self._stub.PinPack, request, TRANSFER_TIMEOUT))

    def unpin_pack(self, ref: Ref | str) -> Revision:
        return revision_from_pb(self._call(self._stub.UnpinPack, requests.pack_ref_request(ref)))

    def evict_pack(self, ref: Ref | str) -> Revision:
        """Drop ``ref``'s pack from the catalog's NVMe tier; returns its revision.

        This client's own lease releases still in flight (a colocated fetch returns before the
        catalog has its release) are waited for first, so a fetch then an evict from one client
        is never refused for the fetch's lease.

        Raises:
            FailedPrecondition: no NVMe tier, or another engine holds a lease on the pack.
            NotFound, InvalidReference: as named.
        """
        if self.colocated is not None:
            self.colocated.flush()
        return revision_from_pb(self._call(self._stub.EvictPack, requests.pack_ref_request(ref)))

    def export_peft_dir(
        self,
        ref: Ref | Revision | str,
        dest: str | Path,
        *,
        nonce: str,
        fsync: bool = False,
        served_base: str = "",
        max_rank: int = 0,
        timeout: float = TRANSFER_TIMEOUT,
    ) -> tuple[Revision, int]:
        """Have a colocated catalog write ``ref``'s revision as PEFT files into ``dest``, an
        existing directory under the server's ``--peft-export-root`` holding a
        ``.loracat-export-nonce`` file with exactly ``nonce`` (``catalog.peft_export``);
        returns the revision and the files' total size. With ``served_base`` (a
        ``catalog.bases.base_identity``) or ``max_rank``, the server refuses a revision that
        does not fit before it reads a byte (``catalog.peft_export.check_fits``): an engine's
        first request for a mutable ref need not resolve it first.

        Raises:
            IncompatibleAdapter: the revision does not fit ``served_base`` / ``max_rank``.
            FailedPrecondition: the server exports nothing, or ``dest`` does not hold
                ``nonce`` as the server sees it (another host).
            PermissionDenied: ``dest`` is not under the server's export root.
            InvalidArgument, InvalidReference, NotFound, DataLoss, InvalidPack: as named.
        """
        request = requests.export_peft_dir_request(ref, dest, nonce, fsync, served_base, max_rank)
        return answers.exported(self._call(self._stub.ExportPeftDir, request, timeout))

    def list_cache(self) -> list[dict[str, Any]]:
        """The NVMe tier's entries: digest, size, pins, when inserted."""
        return answers.cache_entries(self._call(self._stub.ListCache, pb.ListCacheRequest()))

    def export_requests(
        self, *, since: float = 0.0, engine: str = "", timeout: float = TRANSFER_TIMEOUT
    ) -> list[dict[str, Any]]:
        """The server's request record (resolves and fetches it answered, oldest first, from
        ``since`` seconds since the epoch, of ``engine`` if given): ``time``, ``kind``, ``ref``,
        ``size_bytes``, ``engine``. Raises ``FailedPrecondition`` when the server keeps none."""
        request = pb.ExportRequestsRequest(since=since, engine=engine)
        with translated(self.target):
            return [
                record
                for message in self._stub.ExportRequests(request, timeout=timeout)
                for record in answers.request_records(message)
            ]

    # -- engines ----------------------------------------------------------------------------

    def watch_hints(self, engine_id: str) -> HintStream:
        """The catalog's hints for a registered engine: iterate it (on a thread of its own) until
        the server ends it or :meth:`HintStream.cancel` is called. Raises ``NotFound`` (while
        iterating) for an engine that is not registered."""
        return HintStream(
            self._stub.WatchHints(pb.WatchHintsRequest(engine_id=engine_id)), self.target
        )

    def register_engine(
        self, engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int = 0
    ) -> None:
        request = requests.register_request(engine_id, base_id, num_slots, max_rank, host_bytes)
        self._call(self._stub.RegisterEngine, request)

    def report_residency(
        self,
        engine_id: str,
        gpu: list[str],
        host: list[str],
        *,
        tiers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """What an engine holds (digests in GPU slots and host memory) and, optionally, its
        counters for those tiers (``tier`` plus any of ``catalog.core.ENGINE_TIER_FIELDS``)."""
        request = requests.residency_request(engine_id, gpu, host, tiers)
        self._call(self._stub.ReportResidency, request)

    # -- lifecycle --------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected (``Unavailable`` after ``timeout``)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise not_ready(self.target) from None

    def close(self) -> None:
        if self.colocated is not None:
            self.colocated.close()
        self._channel.close()

    def __enter__(self) -> CatalogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
