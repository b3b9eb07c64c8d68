"""Prometheus metrics, the health endpoint and the access log of the catalog server.

Catalog state is read at scrape time by a collector (one source of truth, nothing to keep in
sync): what only goes up is a counter (``loracat_events_total``, ``loracat_tier_hits_total``,
...), what goes up and down a gauge (``loracat_state``, ``loracat_tier_bytes``, ...). Every RPC
is observed once by its handler (``catalog.service.handlers``) with its status code:
``loracat_rpc_seconds{method, code}``, and, when the access log is on, one log line.

``/healthz`` answers 200 only while the catalog can answer: its index reads, and its durable
store answers and still holds a blob the index references; otherwise 503 naming what failed.
Other paths than ``/metrics`` and ``/healthz`` are 404.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from catalog.core import Catalog
from catalog.events import blob_key

RPC_LATENCY = Histogram(
    "loracat_rpc_seconds",
    "Catalog RPC latency by method and status code",
    ["method", "code"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
#: One line per RPC when ``serve --access-log`` is on.
ACCESS_LOGGER = "loracat.access"
#: Entries of ``Catalog.stats()["counters"]`` that go down as well as up: exported as gauges.
GAUGE_COUNTERS = frozenset(
    {
        "hint_subscribers",
        "nvme_bytes",
        "nvme_entries",
        "nvme_capacity_bytes",
        "nvme_pinned",
        "nvme_pinned_bytes",
        "nvme_chunk_bytes",
        "nvme_file_bytes",
        "nvme_map_size",
        "lease_active",  # leases on NVMe entries held by colocated engines now
    }
)

Observe = Callable[[float, str, str], None]
#: What ``/healthz`` asks an empty catalog's store for (it need not exist).
HEALTH_PROBE_KEY = "healthz"


def rpc_observer(method: str, access_log: logging.Logger | None = None) -> Observe:
    """What a handler calls once per call of ``method``: ``(seconds, status code, peer)``."""
    by_code: dict[str, Any] = {}

    def observe(seconds: float, code: str, peer: str) -> None:
        histogram = by_code.get(code)
        if histogram is None:
            histogram = by_code[code] = RPC_LATENCY.labels(method, code)
        histogram.observe(seconds)
        if access_log is not None:
            access_log.info("%s %s %s %.3fms", peer or "-", method, code, seconds * 1000)

    return observe


class CatalogCollector(Collector):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[Any]:
        stats = self.catalog.stats()
        for name in ("adapters", "revisions", "aliases", "index_bytes", "engines"):
            yield GaugeMetricFamily(
                f"loracat_{name}", f"Catalog {name.replace('_', ' ')}", value=stats[name]
            )
        occupancy = GaugeMetricFamily("loracat_tier_bytes", "Bytes held per tier", labels=["tier"])
        entries = GaugeMetricFamily(
            "loracat_tier_entries", "Entries held per tier", labels=["tier"]
        )
        traffic = {
            kind: CounterMetricFamily(f"loracat_tier_{kind}", f"Tier {kind}", labels=["tier"])
            for kind in ("hits", "misses", "evictions", "bytes_in", "bytes_out")
        }
        for tier in stats["tiers"]:
            occupancy.add_metric([tier["tier"]], tier.get("bytes", 0))
            entries.add_metric([tier["tier"]], tier.get("entries", 0))
            for kind, family in traffic.items():
                family.add_metric([tier["tier"]], tier.get(kind, 0))
        yield occupancy
        yield entries
        yield from traffic.values()
        counters = CounterMetricFamily(
            "loracat_events", "Catalog event counters (only go up)", labels=["event"]
        )
        gauges = GaugeMetricFamily(
            "loracat_state", "Catalog levels that go up and down", labels=["name"]
        )
        for key, value in sorted(stats["counters"].items()):
            (gauges if key in GAUGE_COUNTERS else counters).add_metric([key], float(value))
        yield counters
        yield gauges


def health_problems(catalog: Catalog) -> list[str]:
    """What stops the catalog from answering now; empty when it is healthy."""
    problems = []
    try:
        catalog.generation()
        catalog.index.counts()
    except Exception as exc:  # any failure here is the answer, not a crash of the endpoint
        problems.append(f"index: {exc}")
    try:
        # one blob the index says exists must be in the durable store: this asks the store
        # (S3 reachable, directory mounted) and checks it still holds what the index names
        first = next(iter(catalog.index.referenced_digests()), None)
        if first is None:
            catalog.store.size(HEALTH_PROBE_KEY)
        elif catalog.store.size(blob_key(first[0])) is None:
            problems.append(
                f"durable store {catalog.store.url}: blob {first[0]} the index references "
                "is missing"
            )
    except Exception as exc:
        problems.append(f"durable store {catalog.store.url}: {exc}")
    return problems


def _handler(catalog: Catalog) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif path == "/healthz":
                problems = health_problems(catalog)
                doc = {"status": "unhealthy" if problems else "ok", "problems": problems}
                body = json.dumps(doc).encode()
                self._send(503 if problems else 200, "application/json", body)
            else:
                self._send(404, "text/plain", b"not found: /metrics or /healthz\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the server's log

    return MetricsHandler


def start_metrics_server(catalog: Catalog, host: str, port: int) -> int:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` (0 picks a port); returns the bound
    port. Raises ``OSError`` when the port cannot be bound."""
    REGISTRY.register(CatalogCollector(catalog))
    server = ThreadingHTTPServer((host, port), _handler(catalog))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="loracat-metrics", daemon=True).start()
    return int(server.server_address[1])
