"""The conformance suite against the in-memory index."""

from __future__ import annotations

from pathlib import Path

from catalog.index.base import RevisionIndex
from catalog.index.memory_index import MemoryIndex
from tests.index.suite import RevisionIndexSuite


class TestMemoryIndex(RevisionIndexSuite):
    def make_index(self, path: Path) -> RevisionIndex:
        return MemoryIndex()
