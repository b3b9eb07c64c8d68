"""Bench-only prototype: the catalog server with a resolve cache validated by the index's LMDB
transaction id. Not the shipped server: it reads ``LmdbIndex._env``, standing in for a public
``RevisionIndex.generation()`` the index would have to offer (see docs/PERFORMANCE.md).

Why: at 10^6 revisions a resolve walks several LMDB B-trees over a ~370 MB map; between calls the
gRPC machinery evicts those pages and the handler's code from the CPU caches, so in the server the
lookup costs ~50 us instead of the ~14 us a tight loop measures, and at 8+ callers that Python
time competes with gRPC's own Python for the GIL. A hit skips the lookup and the conversion.

Correctness: an entry is ``(index, txnid, response)``, stored only when no write committed while
it was computed, and used only while the index object is the same and its last committed
transaction id is unchanged; every index write (any process) commits a new transaction.

Run: python bench/resolve_cache_server.py ROOT PORT  (prints "serving" when ready)
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.convert import revision_to_pb
from catalog.core import Catalog
from catalog.service.server import open_catalog, served_methods, server_options
from catalog.service.servicer import CatalogServicer

CACHE_ENTRIES = 1 << 16


class CachedResolveServicer(CatalogServicer):
    def __init__(self, catalog: Catalog) -> None:
        super().__init__(catalog)
        self._cache: dict[str, tuple[object, int, pb.Revision]] = {}

    def _generation(self) -> tuple[object, int]:
        index = self.catalog.index
        with index._env.begin() as txn:  # type: ignore[attr-defined]
            return index, txn.id()

    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext) -> pb.Revision:
        index, generation = self._generation()
        hit = self._cache.get(request.ref)
        if hit is not None and hit[0] is index and hit[1] == generation:
            return hit[2]
        response = revision_to_pb(self.catalog.resolve(request.ref))
        if self._generation() == (index, generation):
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[request.ref] = (index, generation, response)
        return response


def main() -> None:
    from concurrent import futures

    from catalog.service.server import DEFAULT_MAX_HINT_WATCHERS, DEFAULT_MAX_WORKERS

    root, port = Path(sys.argv[1]), int(sys.argv[2])
    catalog = open_catalog(root, cache_bytes=0)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=DEFAULT_MAX_WORKERS + DEFAULT_MAX_HINT_WATCHERS),
        options=server_options(),
    )
    servicer: Any = served_methods(CachedResolveServicer(catalog))
    pb_grpc.add_CatalogServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("loracat prototype serving", flush=True)
    try:
        threading.Event().wait()
    finally:
        server.stop(None)
        catalog.close()


if __name__ == "__main__":
    main()
