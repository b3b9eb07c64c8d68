from __future__ import annotations

from collections.abc import Iterator

import pytest

from catalog.storage import BlobStore
from catalog.storage.memory import MemoryStore
from tests.storage.contract import BlobStoreContract


class TestMemoryStore(BlobStoreContract):
    reopenable = False

    @pytest.fixture
    def store(self) -> Iterator[BlobStore]:
        with MemoryStore() as store:
            yield store
