"""The one JSON shape of each thing `loracat ... --json` prints.

Rules, the same for every command: times are ISO-8601 UTC strings (``2026-12-04T18:09:14.123Z``);
counts and sizes are integers; aliases are always an object ``{alias: revision}``; something
unset is ``null`` (never ``0`` or ``""``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from catalog.model import AdapterSummary, AliasMove, Revision


def iso_time(ts: float) -> str | None:
    """``ts`` (seconds since the epoch) as ISO-8601 UTC with milliseconds; ``None`` for 0."""
    if not ts:
        return None
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def revision_doc(revision: Revision) -> dict[str, Any]:
    """``show``, ``push``, ``ls --revisions``, ``meta``."""
    doc = revision.to_json()
    doc["aliases"] = {alias: revision.number for alias in revision.aliases}
    doc["created_at"] = iso_time(revision.created_at)
    return doc


def adapter_doc(summary: AdapterSummary) -> dict[str, Any]:
    """``ls``."""
    doc = summary.to_json()
    doc["latest"] = summary.latest or None
    doc["aliases"] = dict(sorted(summary.aliases.items()))
    doc["created_at"] = iso_time(summary.created_at)
    doc["updated_at"] = iso_time(summary.updated_at)
    return doc


def move_doc(move: AliasMove) -> dict[str, Any]:
    """``alias set|rm``, ``rollback``, ``alias history``: ``previous``/``revision`` are null
    when the alias was unset before / removed by the move; ``seq`` is null for a no-op move."""
    return {
        "name": str(move.adapter),
        "alias": move.alias,
        "previous": move.previous or None,
        "revision": move.revision or None,
        "at": iso_time(move.at),
        "seq": move.seq or None,
        "principal": move.principal or None,  # who moved it; null when anonymous
    }
