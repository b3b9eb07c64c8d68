"""The NVMe tier's cache and the tools to choose its eviction policy.

- :mod:`catalog.cache.policies`: ``EvictionPolicy`` and its implementations, ``POLICIES``,
  ``DEFAULT_POLICY``, ``make_policy``, put together from ``eviction_policy`` (the ABC and its
  request protocol), ``recency_policies``, ``tinylfu`` and ``size_aware_policies``;
  :mod:`catalog.cache.lazy_heap` ranks keys for the heap-based ones.
- :mod:`catalog.cache.pack_cache`: ``PackCache``, pack bytes in LMDB under a byte budget, put
  together from its parts: ``environment`` (the LMDB environment), ``reads``, ``fills`` (the
  miss path), ``pins`` (pins, holds, eviction), ``repair`` (corrupt copies), ``admission``
  (at push), over ``cache_state`` (their shared state); ``layout``, ``chunk_reads`` and
  ``chunk_writes`` are the on-disk format and the steps inside one transaction.
- :mod:`catalog.cache.traces`: the request-trace file format and synthetic workloads.
- :mod:`catalog.cache.replay`: ``simulate`` a trace through a policy, LRU and Belady
  (``loracat cache simulate``), and ``format_simulation``.
"""

from catalog.cache.policies import (
    DEFAULT_POLICY,
    POLICIES,
    EvictionPolicy,
    make_policy,
    resolve_policy_name,
)

__all__ = ["DEFAULT_POLICY", "POLICIES", "EvictionPolicy", "make_policy", "resolve_policy_name"]
