"""Revision metadata: the limits on it and the edits of it (eval results, descriptions).

Mixed into ``catalog.core.Catalog``; every edit is one ``metadata`` event on the write path.
"""

from __future__ import annotations

import time

from catalog.catalog_parts import CatalogParts
from catalog.errors import InvalidArgument
from catalog.events import Event
from catalog.model import Ref, Revision
from catalog.push_upload import Limits


def check_metadata(metadata: dict[str, str], limits: Limits) -> dict[str, str]:
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


class MetadataEdits(CatalogParts):
    """``set_metadata`` of :class:`catalog.core.Catalog`."""

    limits: Limits

    def set_metadata(self, ref: Ref | str, metadata: dict[str, str]) -> Revision:
        """Merge ``metadata`` into a revision's (e.g. eval results). Raises ``NotFound``."""
        parsed = Ref.parse(ref) if isinstance(ref, str) else ref
        clean = check_metadata(metadata, self.limits)
        with self._swap.shared(), self._adapter_locks.hold(parsed.adapter):
            revision = self.index.resolve(parsed)
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
                )
            )
            updated = self.index.get_revision(parsed.adapter, revision.number)
        assert updated is not None
        return updated
