"""Durable-tier backends behind one small ABC, opened by URL scheme."""

from catalog.storage.base import BlobStore

__all__ = ["BlobStore"]
