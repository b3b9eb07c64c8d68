"""Prometheus metrics: per-tier occupancy, hits, misses, evictions, bytes moved, RPC latency.

Catalog state is read at scrape time by a collector (one source of truth, nothing to keep in
sync); RPC latency is a histogram observed by the wrapper ``catalog.service.server`` puts around
every servicer method.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from catalog.core import Catalog

RPC_LATENCY = Histogram(
    "loracat_rpc_seconds",
    "Catalog RPC latency by method",
    ["method"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)


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
        counters = CounterMetricFamily("loracat_events", "Catalog event counters", labels=["event"])
        for key, value in sorted(stats["counters"].items()):
            counters.add_metric([key], float(value))
        yield counters


def start_metrics_server(catalog: Catalog, host: str, port: int) -> int:
    """Serve ``/metrics`` on ``host:port`` (0 picks a port); returns the bound port."""
    REGISTRY.register(CatalogCollector(catalog))
    server, _ = start_http_server(port, addr=host)
    return int(server.server_address[1])
