"""Helpers for tests, benchmarks and demos that need real servers (not mocks)."""

from catalog.testing.seaweedfs import SeaweedFS, SeaweedFSError, find_weed

__all__ = ["SeaweedFS", "SeaweedFSError", "find_weed"]
