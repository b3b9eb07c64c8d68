"""Revision metadata: its limits, its reserved keys, provenance, and the edits of it.

Metadata is a flat ``str -> str`` map per revision, carried in the durable log (the ``push``
event holds the first version, each ``metadata`` event an edit), so ``reindex`` keeps it. A few
keys have a meaning the catalog knows:

- ``description``: one line about the revision (``loracat meta set REF description=...``);
- ``model_card``: the adapter's ``README.md``, kept through push and pull;
- ``eval.<key>``: evaluation results (``push --eval``, or set later);
- ``provenance.<key>``: who pushed it and from what, written by the catalog at push time only
  (``principal``, ``host``, ``run_id``, ``parent``, ``parent_digest``, ``data_digest``); no edit
  may set or remove these, so they stay what the push recorded.

Mixed into ``catalog.core.Catalog``; every edit is one ``metadata`` event on the write path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from catalog.catalog_parts import CatalogParts
from catalog.digest import Digest
from catalog.errors import InvalidArgument
from catalog.events import Event
from catalog.model import Ref, Revision
from catalog.push_upload import Limits

DESCRIPTION_KEY = "description"
MODEL_CARD_KEY = "model_card"
EVAL_PREFIX = "eval."
PROVENANCE_PREFIX = "provenance."
#: Who pushed when the server knows nobody (no authentication configured).
ANONYMOUS = "anonymous"


def check_metadata(metadata: dict[str, str], limits: Limits) -> dict[str, str]:
    """``metadata`` if it fits ``limits``; raises ``InvalidArgument`` naming the offending key."""
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidArgument(
            f"{len(metadata)} metadata entries; at most {limits.max_metadata_entries} are allowed"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or len(key) > limits.max_metadata_key:
            raise InvalidArgument(
                f"metadata key {str(key)[:40]!r} must be 1-{limits.max_metadata_key} chars"
            )
        if not isinstance(value, str) or len(value) > limits.max_metadata_value:
            raise InvalidArgument(
                f"metadata value of {key!r} exceeds {limits.max_metadata_value} chars"
            )
    return dict(metadata)


def check_user_keys(keys: list[str] | tuple[str, ...] | dict[str, str], what: str) -> None:
    """Refuse keys a client may not write: ``provenance.*`` is the catalog's own record.

    Raises ``InvalidArgument``.
    """
    reserved = sorted(k for k in keys if isinstance(k, str) and k.startswith(PROVENANCE_PREFIX))
    if reserved:
        raise InvalidArgument(
            f"{what}: metadata keys {', '.join(reserved)} are reserved: provenance.* is "
            "recorded by the catalog at push time (use --run-id, --parent, --data-digest)"
        )


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a revision came from, as stated at push (the principal as the server knows it)."""

    principal: str = ANONYMOUS
    host: str = ""
    run_id: str = ""
    parent: Revision | None = None
    data_digest: str = ""
    eval: tuple[tuple[str, str], ...] = ()

    def metadata(self) -> dict[str, str]:
        """The ``provenance.*`` and ``eval.*`` metadata entries; unset fields are left out.

        Raises ``InvalidArgument`` for a data digest that is not ``algo:hex`` or an eval key
        that is empty.
        """
        doc = {f"{PROVENANCE_PREFIX}principal": self.principal or ANONYMOUS}
        if self.host:
            doc[f"{PROVENANCE_PREFIX}host"] = self.host
        if self.run_id:
            doc[f"{PROVENANCE_PREFIX}run_id"] = self.run_id
        if self.parent is not None:
            doc[f"{PROVENANCE_PREFIX}parent"] = f"{self.parent.adapter}@{self.parent.number}"
            doc[f"{PROVENANCE_PREFIX}parent_digest"] = str(self.parent.digest)
        if self.data_digest:
            doc[f"{PROVENANCE_PREFIX}data_digest"] = str(Digest.parse(self.data_digest))
        for key, value in self.eval:
            if not key:
                raise InvalidArgument("an eval result needs a key (KEY=VALUE)")
            doc[f"{EVAL_PREFIX}{key}"] = value
        return doc


class MetadataEdits(CatalogParts):
    """``set_metadata`` of :class:`catalog.core.Catalog`."""

    limits: Limits

    def set_metadata(
        self,
        ref: Ref | str,
        metadata: dict[str, str],
        *,
        remove: list[str] | tuple[str, ...] = (),
    ) -> Revision:
        """Merge ``metadata`` into a revision's (eval results, a description, tags), then drop
        the keys in ``remove`` (keys it does not have are ignored).

        Raises ``NotFound`` (the revision), ``InvalidReference``, ``InvalidArgument`` (nothing
        to do, a key over the limits, a ``provenance.*`` key, or more entries than allowed).
        """
        parsed = Ref.parse(ref) if isinstance(ref, str) else ref
        clean = check_metadata(metadata, self.limits)
        removed = tuple(dict.fromkeys(remove))
        if not clean and not removed:
            raise InvalidArgument(f"metadata edit of {parsed}: no keys to set or remove")
        if set(clean) & set(removed):
            both = ", ".join(sorted(set(clean) & set(removed)))
            raise InvalidArgument(f"metadata edit of {parsed}: {both} both set and removed")
        check_user_keys(clean, f"metadata edit of {parsed}")
        check_user_keys(removed, f"metadata edit of {parsed}")
        with self._swap.shared(), self._adapter_locks.hold(parsed.adapter):
            revision = self.index.resolve(parsed)
            after = {**revision.metadata, **clean}
            for key in removed:
                after.pop(key, None)
            check_metadata(after, self.limits)
            state = self.index.adapter_state(parsed.adapter)
            assert state is not None
            self._append(
                Event(
                    adapter=parsed.adapter,
                    seq=state.next_seq,
                    op="metadata",
                    at=time.time(),
                    revision=revision.number,
                    metadata=clean,
                    removed=removed,
                )
            )
            updated = self.index.get_revision(parsed.adapter, revision.number)
        assert updated is not None
        return updated
