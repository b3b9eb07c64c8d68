"""From a name vLLM was asked for to a PEFT directory on node-local disk (no vLLM imports).

``CatalogAdapters`` is the resolver's whole decision, kept free of vLLM so that it is tested in
the project's own venv: parse the name as a loracat reference (anything else is refused),
resolve it through the catalog, refuse a revision trained for another base before fetching a
byte, and materialize the revision's pack as a PEFT directory in the node cache, held until the
caller releases it.

Materializing, two ways. A catalog on this host started with ``--peft-export-root`` over the
node cache writes the PEFT files itself (``ExportPeftDir``, ``catalog.peft_export``) into the
node cache's private temporary directory: the pack's bytes never cross gRPC, and none of the
work runs in vLLM's process, whose API server shares the GIL with the resolver. Otherwise (a
remote catalog, or one without the flag) the pack is fetched and written here. The node cache
publishes the directory either way, by its rename, after the files are complete.

The cold path in one round trip. The node's very first request for a name is not resolved
first: ``ExportPeftDir`` gets the name as written with the served base and the rank limit, and
the catalog resolves, refuses a misfit before reading a byte, writes, and answers the revision;
the node cache publishes the files under that revision's digest (``acquire_first``). Every other
request resolves first (its directory is found by digest, written by whichever request was
first): the node cache's single flight is keyed by digest, and only the first request for a
name, which holds the name's lock, can skip learning the digest.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from catalog.bases import base_identity
from catalog.digest import Digest
from catalog.errors import FailedPrecondition, IncompatibleAdapter, Internal, PermissionDenied
from catalog.model import Ref, Revision, Selector
from catalog.pack import export_peft_dir
from catalog.peft_export import NONCE_FILE, check_fits
from engine_plugin.vllm.node_cache import PeftDirCache

log = logging.getLogger(__name__)

#: After the catalog refused an export, the plugin fetches instead for this long before it
#: asks again (a catalog restarted with ``--peft-export-root`` is used again).
EXPORT_RETRY_S = 60.0


#: Added to a wrong-base refusal: the usual cause is a local copy of the catalog's base.
BASE_HINT = (
    " (set LORACAT_BASE_ID to the catalog's base id for the served model if they are the same base)"
)


def hinted(exc: IncompatibleAdapter) -> IncompatibleAdapter:
    """``exc`` with ``BASE_HINT`` added when it is about the base."""
    return IncompatibleAdapter(f"{exc}{BASE_HINT if 'trained for base' in str(exc) else ''}")


class AdapterCatalog(Protocol):
    """What the resolver needs of a catalog (``catalog.client.CatalogClient`` has it)."""

    def resolve(self, ref: Ref | str) -> Revision: ...

    def fetch(self, ref: Ref | Revision | str) -> memoryview: ...


def is_mutable(ref: Ref) -> bool:
    """Whether ``ref`` can name another revision later: aliases (``latest`` included) move;
    revision numbers and digests never do."""
    return ref.selector is Selector.ALIAS


@dataclass(frozen=True)
class Materialized:
    """A revision on node-local disk, held for the caller until released."""

    name: str  # the name vLLM was asked for
    ref: Ref
    revision: Revision
    path: Path
    #: Seconds spent, for the log: ``resolve``, and when this call wrote the directory
    #: ``export`` (the catalog wrote it) or ``fetch``/``write`` (this process did); a hit on
    #: node disk has none of those.
    timings: dict[str, float] = field(default_factory=dict, compare=False)


class CatalogAdapters:
    """Resolve loracat references for one served base and materialize them on this node.

    Args:
        catalog: a catalog client.
        cache: the node-local directory cache.
        served_base: the base the vLLM serves, as ``base_identity`` normalizes it
            (``LORACAT_BASE_ID`` when set, else the model path vLLM passes).
        max_rank: the largest rank the server takes (vLLM's ``--max-lora-rank``); 0: any.
        server_export: ask the catalog to write the PEFT files (``ExportPeftDir``) before
            fetching them; a catalog that cannot (another host, no export root) is asked
            again only after ``EXPORT_RETRY_S``.
    """

    def __init__(
        self,
        catalog: AdapterCatalog,
        cache: PeftDirCache,
        served_base: str,
        *,
        max_rank: int = 0,
        server_export: bool = True,
    ) -> None:
        self.catalog = catalog
        self.cache = cache
        self.served_base = served_base
        self.max_rank = max_rank
        self.server_export = server_export and hasattr(catalog, "export_peft_dir")
        self._export_refused_at: float | None = None
        self.exports = 0  # directories the catalog wrote for this process

    @staticmethod
    def parse(name: str) -> Ref:
        """``name`` as a loracat reference. Raises ``InvalidReference`` for anything else
        (``../../etc``, spaces, 300 characters, a digest prefix shorter than 12 hex digits)."""
        return Ref.parse(name)

    def resolve(self, name: str) -> tuple[Ref, Revision]:
        """The revision ``name`` names now, checked against the served base.

        Raises:
            InvalidReference: ``name`` is not a loracat reference.
            NotFound: no such adapter, revision or alias.
            IncompatibleAdapter: the revision was trained for another base, or its rank is
                above ``max_rank``.
            Unavailable, DeadlineExceeded: the catalog cannot be reached.
        """
        ref = self.parse(name)
        revision = self.catalog.resolve(ref)
        self.check_fits(name, revision)
        return ref, revision

    def check_fits(self, name: str, revision: Revision) -> None:
        """Refuse a revision whose ``base_id`` names another base (an empty one is accepted:
        vLLM still checks the shapes when it loads the adapter) or whose rank the server
        cannot take.

        Raises:
            IncompatibleAdapter: the bases differ, or the rank is above ``max_rank``.
        """
        try:
            check_fits(name, revision, self.served_base, self.max_rank)
        except IncompatibleAdapter as exc:
            raise hinted(exc) from None

    def materialize(self, name: str, ref: Ref, revision: Revision) -> Materialized:
        """Make ``revision`` a PEFT directory on node-local disk (fetched at most once per host)
        and hold it for the caller; :meth:`release` drops the hold.

        Raises:
            NotFound: the revision was deleted meanwhile.
            DataLoss: the fetched bytes do not match the digest.
            InvalidPack: the pack cannot be written as a PEFT directory.
            Unavailable, DeadlineExceeded: the catalog cannot be reached.
        """
        pinned = f"{revision.adapter}@{revision.digest}"
        timings: dict[str, float] = {}

        def write(into: Path) -> int:
            started = time.perf_counter()
            exported = self._export(pinned, into)
            if exported is not None:
                timings["export"] = time.perf_counter() - started
                return exported[1]
            started = time.perf_counter()
            data = self.catalog.fetch(pinned)
            fetched = time.perf_counter()
            export_peft_dir(data, into, fsync=self.cache.fsync)
            timings.update(fetch=fetched - started, write=time.perf_counter() - fetched)
            return len(data)

        path = self.cache.acquire(revision.digest, write)
        return Materialized(name, ref, revision, path, timings)

    def _may_export(self) -> bool:
        """Whether to ask the catalog to write PEFT files now (see ``EXPORT_RETRY_S``)."""
        if not self.server_export:
            return False
        refused_at = self._export_refused_at
        return refused_at is None or time.monotonic() - refused_at >= EXPORT_RETRY_S

    def _export(self, ref: str, into: Path, **fit: str | int) -> tuple[Revision, int] | None:
        """Have the catalog write the PEFT files of ``ref`` into ``into`` (``fit``: the
        ``served_base`` and ``max_rank`` it checks first); the revision and the bytes written,
        or ``None`` when it cannot (then the caller fetches). Errors about the revision itself
        (unknown, misfit, deleted, corrupt) propagate, as they would from a resolve or fetch."""
        if not self._may_export():
            return None
        refused_at = self._export_refused_at
        nonce = secrets.token_hex(16)
        (into / NONCE_FILE).write_text(nonce)
        try:
            revision, written = self.catalog.export_peft_dir(  # type: ignore[attr-defined]
                ref, into, nonce=nonce, fsync=self.cache.fsync, **fit
            )
        except IncompatibleAdapter as exc:  # a misfit, not a refusal to export
            raise hinted(exc) from None
        except (FailedPrecondition, PermissionDenied, Internal) as exc:
            # Internal: a catalog that predates ExportPeftDir answers UNIMPLEMENTED.
            if refused_at is None:
                log.info("the catalog does not write PEFT directories here: %s; fetching", exc)
            self._export_refused_at = time.monotonic()
            return None
        finally:
            (into / NONCE_FILE).unlink(missing_ok=True)
        self._export_refused_at = None
        self.exports += 1
        return revision, int(written)

    def load(self, name: str) -> Materialized:
        """:meth:`resolve`, then :meth:`materialize` (see both for what they raise), except for
        the very first cold request for ``name`` on this node when the catalog writes PEFT
        directories here: then one ``ExportPeftDir`` call resolves, checks the fit and
        writes (:meth:`load_first`)."""
        first = self.load_first(name)
        if first is not None:
            return first
        started = time.perf_counter()
        ref, revision = self.resolve(name)
        resolved = time.perf_counter() - started
        materialized = self.materialize(name, ref, revision)
        materialized.timings["resolve"] = resolved
        return materialized

    def load_first(self, name: str) -> Materialized | None:
        """The cold path in one round trip: the catalog resolves ``name``, refuses a revision
        that does not fit (base, rank) before reading a byte, and writes the PEFT files into a
        private directory of the node cache, which publishes them under the digest the catalog
        answered (``PeftDirCache.acquire_first``); that revision is the one returned, so a
        mutable name is bound to what it named when it was read. ``None`` when this is not the
        node's first request for ``name`` (the caller resolves, and finds the first one's
        directory by digest) or the catalog cannot write here (the caller fetches).

        Raises:
            InvalidReference: ``name`` is not a loracat reference.
            NotFound: no such adapter, revision or alias.
            IncompatibleAdapter: the revision was trained for another base, or its rank is
                above ``max_rank``.
            DataLoss, InvalidPack, Unavailable, DeadlineExceeded: as :meth:`materialize`.
        """
        ref = self.parse(name)
        if not self._may_export():
            return None
        timings: dict[str, float] = {}
        found: list[Revision] = []

        def export(into: Path) -> tuple[Digest, int] | None:
            started = time.perf_counter()
            exported = self._export(
                str(ref), into, served_base=self.served_base, max_rank=self.max_rank
            )
            if exported is None:
                return None
            revision, written = exported
            # A catalog that predates the fit fields ignores them: check here too.
            self.check_fits(name, revision)
            timings["export"] = time.perf_counter() - started
            found.append(revision)
            return revision.digest, written

        path = self.cache.acquire_first(str(ref), export)
        if path is None:
            return None
        return Materialized(name, ref, found[0], path, timings)

    def release(self, materialized: Materialized) -> None:
        self.cache.release(materialized.revision.digest)


def served_base_identity(model: str, declared: str | None = None) -> str:
    """The served base's identity: ``declared`` (``LORACAT_BASE_ID``) when given, else the
    model path vLLM was started with, normalized by :func:`base_identity`."""
    if declared is None:
        declared = os.environ.get("LORACAT_BASE_ID") or None
    return base_identity(declared if declared else model)
