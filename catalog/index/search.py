"""Filtered adapter listings (``loracat ls --base/--tag/--alias``), answered from the index.

The filters look at what the index already holds per adapter: its alias map and its ``latest``
revision record (``base_id`` and metadata, where tags live). A filtered listing walks the plain
listing in key order and keeps the adapters that match, so it pages with the same tokens: a
token names the last adapter *examined*, not the last one returned. One call examines at most
``MAX_EXAMINED`` adapters; a page can therefore hold fewer than ``page_size`` adapters (even
none) and still carry a next token, and a caller pages until the token is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from catalog import keys
from catalog.index import paging
from catalog.index.base import MAX_PAGE_SIZE
from catalog.model import LATEST, AdapterSummary, Page, check_part

if TYPE_CHECKING:
    from catalog.index.base import RevisionIndex

#: Adapters one filtered page may examine before it returns what it has (bounds a call's time).
MAX_EXAMINED = 20_000


@dataclass(frozen=True, slots=True)
class AdapterFilter:
    """What a listed adapter must have. Empty fields match everything."""

    base_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    alias: str = ""

    def __post_init__(self) -> None:
        if self.alias:
            check_part("alias", self.alias)

    @property
    def is_empty(self) -> bool:
        return not (self.base_id or self.tags or self.alias)

    @property
    def needs_revision(self) -> bool:
        return bool(self.base_id or self.tags)


def matches(index: RevisionIndex, summary: AdapterSummary, wanted: AdapterFilter) -> bool:
    """Whether ``summary``'s adapter passes ``wanted`` (its latest revision read when needed)."""
    if wanted.alias and not (
        summary.latest if wanted.alias == LATEST else wanted.alias in summary.aliases
    ):
        return False
    if not wanted.needs_revision:
        return True
    if not summary.latest:
        return False
    revision = index.get_revision(summary.adapter, summary.latest)
    if revision is None:  # deleted since the listing read it
        return False
    if wanted.base_id and revision.base_id != wanted.base_id:
        return False
    return all(revision.metadata.get(k) == v for k, v in wanted.tags.items())


def search_adapters(
    index: RevisionIndex,
    prefix: str,
    page_size: int,
    page_token: str,
    wanted: AdapterFilter,
) -> Page[AdapterSummary]:
    """A page of the adapters under ``prefix`` that pass ``wanted`` (see the module docstring).

    Raises what ``list_adapters`` raises (``InvalidName``, ``InvalidArgument``).
    """
    if wanted.is_empty:
        return index.list_adapters(prefix, page_size, page_token)
    size = paging.page_size_of(page_size)
    found: list[AdapterSummary] = []
    examined = 0
    token = page_token
    while True:
        page = index.list_adapters(prefix, MAX_PAGE_SIZE, token)
        for position, summary in enumerate(page.items):
            examined += 1
            if matches(index, summary, wanted):
                found.append(summary)
            last_of_listing = not page.next_token and position == len(page.items) - 1
            if (len(found) == size or examined >= MAX_EXAMINED) and not last_of_listing:
                adapter = summary.adapter
                return Page(
                    tuple(found), paging.encode_token(keys.encode(adapter.tenant, adapter.name))
                )
        if not page.next_token:
            return Page(tuple(found))
        token = page.next_token
