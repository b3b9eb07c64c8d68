"""Where the engine gets packs: the catalog client, or an in-process stand-in.

The engine depends on two small protocols, not on the gRPC client: ``PackSource`` (resolve a
reference, fetch a pack) and, optionally, ``ResidencySink`` (register the engine, report what
it holds). ``catalog.client.CatalogClient`` satisfies both. ``LocalPackSource`` is an in-process
implementation over a dict, for tests and demos that need no server.

On the catalog's host, ``CatalogClient.fetch`` reads the pack straight from the catalog's NVMe
tier (``catalog.client.colocated``) and returns a read-only buffer that never changes: a private
copy of the checked chunks, or the durable store's own immutable file mapped read-only (a
``file://`` store on the tier's filesystem). Either way the engine may keep views into it (the
``borrow`` of ``staging``) for as long as it likes; no lease outlives the fetch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from catalog.digest import Digest
from catalog.errors import InvalidReference, NotFound
from catalog.model import LATEST, AdapterName, Ref, Revision, Selector
from catalog.pack import read_pack


@runtime_checkable
class PackSource(Protocol):
    def resolve(self, ref: Ref | str) -> Revision:
        """The revision ``ref`` names now. Raises ``NotFound``, ``InvalidReference``."""

    def fetch(self, ref: Ref | Revision | str) -> bytes | memoryview:
        """The verified pack bytes. Raises ``NotFound``, ``DataLoss``.

        Any contiguous buffer will do (a read-only map of a cached pack file, say). A read-only
        buffer must never change afterwards: the engine may keep views into it instead of
        copying (see ``staging``)."""


def fetch_checked(source: PackSource, revision: Revision) -> tuple[bytes | memoryview, bool]:
    """``source.fetch(revision)``, and whether the source vouches that the pack's values are
    all finite, so that staging need not check them again: a source may offer
    ``fetch_checked(revision) -> (bytes, bool)`` for that (``CatalogClient`` does: ``True``
    for a colocated read of an NVMe tier entry the catalog checked when it filled it, see
    ``catalog.cache.layout``); any other source's bytes are checked by the engine.

    Raises:
        As ``PackSource.fetch``.
    """
    offered = getattr(source, "fetch_checked", None)
    if offered is None:
        return source.fetch(revision), False
    data, checked = offered(revision)
    return data, bool(checked)


@runtime_checkable
class ResidencySink(Protocol):
    def register_engine(
        self, engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int = 0
    ) -> None:
        """Announce an engine serving ``base_id``."""

    def report_residency(
        self,
        engine_id: str,
        gpu: list[str],
        host: list[str],
        *,
        tiers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Which digests the engine holds in GPU slots and in host memory, and its counters
        for those two tiers (see ``catalog.core.ENGINE_TIER_FIELDS``)."""


class LocalPackSource:
    """An in-process catalog over a dict: publish packs, move aliases, resolve, fetch.

    Resolution follows the catalog's rules (``t/n`` = alias ``latest``, ``t/n@7``,
    ``t/n@alias``, ``t/n@sha256:<prefix>``). Thread-safe. Also records registrations and
    residency reports, so tests can check what an engine told its catalog.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revisions: dict[AdapterName, dict[int, Revision]] = {}
        self._aliases: dict[AdapterName, dict[str, int]] = {}
        self._packs: dict[str, bytes] = {}
        self.fetches = 0
        self.registrations: list[tuple[str, str, int, int]] = []
        self.reports: list[tuple[str, list[str], list[str]]] = []
        self.tier_reports: list[tuple[str, list[dict[str, Any]]]] = []

    def publish(self, name: str, pack: bytes, *, aliases: tuple[str, ...] = ()) -> Revision:
        """Add ``pack`` as the next revision of ``name``; moves ``latest`` and ``aliases``.

        Raises:
            InvalidName: a bad adapter name.  InvalidPack: the bytes are not a valid pack.
        """
        adapter = AdapterName.parse(name)
        manifest = read_pack(pack).manifest
        digest = Digest.of(pack)
        with self._lock:
            revisions = self._revisions.setdefault(adapter, {})
            number = max(revisions, default=0) + 1
            revision = Revision(
                adapter=adapter,
                number=number,
                digest=digest,
                base_id=manifest.base_id,
                rank=manifest.rank,
                alpha=manifest.alpha,
                dtype=manifest.dtype,
                size_bytes=len(pack),
                created_at=time.time(),
                target_modules=manifest.target_modules,
                num_layers=manifest.num_layers,
                num_experts=manifest.num_experts,
            )
            revisions[number] = revision
            self._packs[str(digest)] = bytes(pack)
            table = self._aliases.setdefault(adapter, {})
            for alias in (LATEST, *aliases):
                table[alias] = number
        return revision

    def set_alias(self, name: str, alias: str, number: int) -> None:
        """Point ``alias`` of ``name`` at revision ``number``. Raises ``NotFound``."""
        adapter = AdapterName.parse(name)
        with self._lock:
            if number not in self._revisions.get(adapter, {}):
                raise NotFound(f"{adapter} has no revision {number}")
            self._aliases.setdefault(adapter, {})[alias] = number

    def resolve(self, ref: Ref | str) -> Revision:
        parsed = Ref.parse(ref) if isinstance(ref, str) else ref
        with self._lock:
            revisions = self._revisions.get(parsed.adapter)
            if not revisions:
                raise NotFound(f"adapter {parsed.adapter} does not exist")
            if parsed.selector is Selector.REVISION:
                number = int(parsed.value)
            elif parsed.selector is Selector.ALIAS:
                aliases = self._aliases.get(parsed.adapter, {})
                if parsed.value not in aliases:
                    raise NotFound(f"{parsed.adapter} has no alias {parsed.value!r}")
                number = aliases[parsed.value]
            else:
                matches = [
                    n for n, r in revisions.items() if str(r.digest).startswith(parsed.value)
                ]
                if len(matches) > 1:
                    raise InvalidReference(f"digest prefix {parsed.value} is ambiguous")
                if not matches:
                    raise NotFound(f"{parsed.adapter} has no revision with digest {parsed.value}")
                number = matches[0]
            if number not in revisions:
                raise NotFound(f"{parsed.adapter} has no revision {number}")
            return revisions[number]

    def fetch(self, ref: Ref | Revision | str) -> bytes:
        revision = ref if isinstance(ref, Revision) else self.resolve(ref)
        with self._lock:
            self.fetches += 1
            return self._packs[str(revision.digest)]

    def register_engine(
        self, engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int = 0
    ) -> None:
        with self._lock:
            self.registrations.append((engine_id, base_id, num_slots, max_rank))

    def report_residency(
        self,
        engine_id: str,
        gpu: list[str],
        host: list[str],
        *,
        tiers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        with self._lock:
            self.reports.append((engine_id, list(gpu), list(host)))
            self.tier_reports.append((engine_id, [dict(t) for t in tiers]))
