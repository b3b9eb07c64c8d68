"""Shared fixtures for the cache tests."""

from __future__ import annotations

import pytest

from catalog.cache.traces import Request, synthetic_catalog


@pytest.fixture(scope="session")
def small_catalog() -> list[Request]:
    """400 adapters with realistic pack sizes (3-86 MiB)."""
    return synthetic_catalog(400, seed=7)
