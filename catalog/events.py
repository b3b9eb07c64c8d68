"""The catalog's durable log: every change to an adapter is one immutable event object.

Events are written to the durable tier first (``log/<tenant>/<name>/<seq:012d>.json``, with a
conditional put so two writers can never both claim a sequence number) and only then applied to
the LMDB index. The index is therefore a cache of the log: ``reindex`` replays every adapter's
events in sequence order and arrives at the same state.

A ``push`` event is also the revision's manifest: it carries the digest, the revision number and
the pack manifest, so a revision can be read with nothing but the durable tier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from catalog.digest import Digest
from catalog.errors import DataLoss
from catalog.model import AdapterName

EVENT_VERSION = 1
LOG_PREFIX = "log/"
BLOB_PREFIX = "blobs/"

EventOp = Literal["push", "alias", "delete", "metadata", "purge"]
EVENT_OP_NAMES = ("push", "alias", "delete", "metadata", "purge")


def log_key(adapter: AdapterName, seq: int) -> str:
    """Object key of event ``seq``; zero-padded so a prefix listing returns events in order."""
    return f"{LOG_PREFIX}{adapter.tenant}/{adapter.name}/{seq:012d}.json"


def log_prefix(adapter: AdapterName | None = None) -> str:
    return LOG_PREFIX if adapter is None else f"{LOG_PREFIX}{adapter.tenant}/{adapter.name}/"


def parse_log_key(key: str) -> tuple[AdapterName, int]:
    """Inverse of :func:`log_key`; raises ``DataLoss`` for a key that is not a log entry."""
    try:
        rest = key.removeprefix(LOG_PREFIX)
        tenant, name, leaf = rest.split("/")
        if not leaf.endswith(".json") or len(leaf) != 17:
            raise ValueError(leaf)
        return AdapterName(tenant, name), int(leaf[:12])
    except Exception as exc:
        raise DataLoss(f"unexpected object in the durable log: {key!r}") from exc


def blob_key(digest: Digest) -> str:
    """Object key of a pack blob; two hex digits of fan-out keep listings and S3 partitions even."""
    return f"{BLOB_PREFIX}{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def parse_blob_key(key: str) -> Digest:
    try:
        _, algorithm, _, hexpart = key.split("/")
        return Digest(algorithm, hexpart)
    except Exception as exc:
        raise DataLoss(f"unexpected object among the blobs: {key!r}") from exc


@dataclass(frozen=True, slots=True)
class Event:
    """One change to one adapter.

    ``op`` decides which fields matter:

    - ``push``: ``revision`` (the new number), ``digest``, ``size_bytes``, ``manifest`` (the pack
      manifest as JSON), ``metadata``.
    - ``alias``: ``alias`` moves from ``previous`` to ``revision`` (0 removes it).
    - ``delete``: ``revision`` is deleted (its number is never reused).
    - ``metadata``: ``metadata`` is merged into ``revision``'s metadata (eval results), then
      the keys in ``removed`` are dropped from it.
    - ``purge``: the name, all of whose revisions were deleted, is forgotten: its aliases and
      alias history go, and the next push starts a new adapter at revision 1. The log keeps its
      events (and numbers the next one after the purge), so a replay arrives at the same state.
    """

    adapter: AdapterName
    seq: int
    op: EventOp
    at: float
    revision: int = 0
    digest: Digest | None = None
    size_bytes: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    alias: str = ""
    previous: int = 0
    removed: tuple[str, ...] = ()
    #: Who made the change: the authenticated principal's name, "" when anonymous.
    principal: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "v": EVENT_VERSION,
            "adapter": str(self.adapter),
            "seq": self.seq,
            "op": self.op,
            "at": self.at,
            "revision": self.revision,
        }
        if self.op == "push":
            assert self.digest is not None
            doc.update(
                digest=str(self.digest),
                size_bytes=self.size_bytes,
                manifest=self.manifest,
                metadata=self.metadata,
            )
        elif self.op == "alias":
            doc.update(alias=self.alias, previous=self.previous)
        elif self.op == "metadata":
            doc.update(metadata=self.metadata)
            if self.removed:  # absent when empty: events written before removal existed match
                doc.update(removed=list(self.removed))
        if self.principal:  # absent when anonymous, as in events written before auth existed
            doc["principal"] = self.principal
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Event:
        if doc.get("v") != EVENT_VERSION:
            raise DataLoss(f"log event has unsupported version {doc.get('v')!r}")
        op = doc["op"]
        if op not in EVENT_OP_NAMES:
            raise DataLoss(f"log event has unknown op {op!r}")
        return cls(
            adapter=AdapterName.parse(doc["adapter"]),
            seq=int(doc["seq"]),
            op=op,
            at=float(doc["at"]),
            revision=int(doc.get("revision", 0)),
            digest=Digest.parse(doc["digest"]) if doc.get("digest") else None,
            size_bytes=int(doc.get("size_bytes", 0)),
            manifest=dict(doc.get("manifest", {})),
            metadata={str(k): str(v) for k, v in doc.get("metadata", {}).items()},
            alias=str(doc.get("alias", "")),
            previous=int(doc.get("previous", 0)),
            removed=tuple(str(k) for k in doc.get("removed", ())),
            principal=str(doc.get("principal", "")),
        )

    @classmethod
    def decode(cls, data: bytes, *, key: str = "") -> Event:
        try:
            return cls.from_json(json.loads(data))
        except DataLoss:
            raise
        except Exception as exc:
            raise DataLoss(f"corrupt log event {key or '(unnamed)'}: {exc}") from exc
