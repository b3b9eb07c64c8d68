"""The catalog's Python SDK: a synchronous client and its asyncio twin over gRPC.

Both return ``catalog.model`` types and raise ``catalog.errors`` exceptions.
"""

from catalog.client.aio import AsyncCatalogClient
from catalog.client.requests import PushResult
from catalog.client.sync import CatalogClient

__all__ = ["AsyncCatalogClient", "CatalogClient", "PushResult"]
