"""The catalog's vocabulary as frozen dataclasses: names, references, revisions, aliases.

These types are what the core, the client SDK and the CLI exchange; the gRPC layer converts them
to and from protobuf in ``catalog.convert`` and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from catalog.digest import Digest, parse_digest_prefix
from catalog.errors import InvalidName, InvalidReference

#: fullmatch, never match with `$`: `$` also matches before a trailing newline ("latest\n").
NAME_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
LATEST = "latest"
RESERVED_ALIASES = frozenset({LATEST})


def check_part(kind: str, value: str) -> str:
    """Validate one name part (tenant, name or alias) against ``[a-z0-9][a-z0-9._-]{0,62}``."""
    if not isinstance(value, str) or not NAME_PART.fullmatch(value):
        shown = value if isinstance(value, str) else type(value).__name__
        raise InvalidName(f"invalid {kind} {shown[:80]!r}: must match [a-z0-9][a-z0-9._-]{{0,62}}")
    return value


@dataclass(frozen=True, order=True, slots=True)
class AdapterName:
    """``tenant/name``: the stable identity of an adapter across its revisions."""

    tenant: str
    name: str

    def __post_init__(self) -> None:
        check_part("tenant", self.tenant)
        check_part("name", self.name)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> AdapterName:
        if not isinstance(text, str):
            raise InvalidName(f"adapter name must be a string, got {type(text).__name__}")
        tenant, sep, name = text.partition("/")
        if not sep:
            raise InvalidName(f"invalid adapter name {text[:80]!r}: expected tenant/name")
        return cls(tenant, name)


class Selector(Enum):
    ALIAS = "alias"
    REVISION = "revision"
    DIGEST = "digest"


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to one revision: by alias, revision number or digest (prefix).

    ``t/n`` means alias ``latest``; ``t/n@7`` revision 7; ``t/n@serving`` an alias;
    ``t/n@sha256:<hex>`` a digest, full or a unique prefix of at least 12 hex digits.
    """

    adapter: AdapterName
    selector: Selector
    value: str  # alias name, decimal revision number, or "algo:hexprefix"

    @classmethod
    def parse(cls, text: str) -> Ref:
        if not isinstance(text, str):
            raise InvalidReference(f"reference must be a string, got {type(text).__name__}")
        base, sep, sel = text.partition("@")
        try:
            adapter = AdapterName.parse(base)
        except InvalidName as exc:
            raise InvalidReference(f"invalid reference {text[:120]!r}: {exc}") from None
        if not sep:
            return cls(adapter, Selector.ALIAS, LATEST)
        if sel.isdigit() and sel.isascii():
            if len(sel) > 10 or int(sel) < 1 or int(sel) > 0xFFFFFFFF:
                raise InvalidReference(f"invalid reference {text[:120]!r}: revision out of range")
            return cls(adapter, Selector.REVISION, str(int(sel)))
        if ":" in sel:
            algorithm, hexpart = parse_digest_prefix(sel)
            return cls(adapter, Selector.DIGEST, f"{algorithm}:{hexpart}")
        try:
            check_part("alias", sel)
        except InvalidName as exc:
            raise InvalidReference(f"invalid reference {text[:120]!r}: {exc}") from None
        return cls(adapter, Selector.ALIAS, sel)

    @classmethod
    def revision(cls, adapter: AdapterName, number: int) -> Ref:
        return cls(adapter, Selector.REVISION, str(number))

    def __str__(self) -> str:
        if self.selector is Selector.ALIAS and self.value == LATEST:
            return str(self.adapter)
        return f"{self.adapter}@{self.value}"


@dataclass(frozen=True, slots=True)
class Revision:
    """One immutable revision of an adapter, as the catalog records it."""

    adapter: AdapterName
    number: int
    digest: Digest
    base_id: str
    rank: int
    alpha: float
    dtype: str
    size_bytes: int
    created_at: float  # seconds since the epoch, UTC
    target_modules: tuple[str, ...] = ()
    num_layers: int = 0
    num_experts: int = 0
    aliases: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def ref(self) -> Ref:
        return Ref.revision(self.adapter, self.number)

    def to_json(self) -> dict[str, Any]:
        """The public JSON shape (``loracat show --json``)."""
        return {
            "name": str(self.adapter),
            "revision": self.number,
            "digest": str(self.digest),
            "aliases": list(self.aliases),
            "base_id": self.base_id,
            "rank": self.rank,
            "alpha": self.alpha,
            "dtype": self.dtype,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "target_modules": list(self.target_modules),
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True, slots=True)
class AdapterSummary:
    """One adapter and where its names point (``loracat ls``)."""

    adapter: AdapterName
    latest: int  # 0 when every revision was deleted
    revision_count: int
    aliases: dict[str, int]
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": str(self.adapter),
            "latest": self.latest,
            "revisions": self.revision_count,
            "aliases": dict(sorted(self.aliases.items())),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class AliasMove:
    """One entry of an alias's history: it pointed at ``previous`` (0 = unset), now ``revision``."""

    adapter: AdapterName
    alias: str
    previous: int
    revision: int  # 0 = the alias was removed
    at: float
    seq: int
    principal: str = ""  # who moved it; "" when anonymous (a catalog without --auth)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": str(self.adapter),
            "alias": self.alias,
            "previous": self.previous,
            "revision": self.revision,
            "at": self.at,
            "seq": self.seq,
            "principal": self.principal,
        }


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next_token`` is empty on the last page."""

    items: tuple[T, ...]
    next_token: str = ""


@dataclass(frozen=True, slots=True)
class PrefetchProgress:
    """The fate of one reference of a prefetch request."""

    ref: str
    state: str  # "done" | "failed" | "cancelled"
    digest: str = ""
    size_bytes: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Hint:
    """Advice from the catalog to an engine: stage (host memory) or attach (a slot) a revision."""

    kind: str  # "attach" | "stage"
    ref: str  # tenant/name@revision
    digest: str
    base_id: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class PushProvenance:
    """Where a pushed adapter came from, as the pusher states it (all optional).

    ``parent`` is a reference the catalog resolves and records with its digest; ``eval`` holds
    evaluation results (kept as ``eval.<key>`` metadata). The pushing principal is not stated:
    the catalog records who the call was authenticated as (anonymous without authentication).
    """

    host: str = ""
    run_id: str = ""
    parent: str = ""
    data_digest: str = ""
    eval: dict[str, str] = field(default_factory=dict)


def every_item(fetch_page: Callable[[str], Page[T]]) -> Iterator[T]:
    """Walk a paged listing: ``fetch_page(token)`` until a page has no ``next_token``."""
    token = ""
    while True:
        page = fetch_page(token)
        yield from page.items
        if not page.next_token:
            return
        token = page.next_token
