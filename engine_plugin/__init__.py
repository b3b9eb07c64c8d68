"""loracat's engine plugin: a resident base model with live multi-LoRA slots.

``ResidentEngine`` wraps a transformers causal LM, attaches adapter revisions from the catalog
into preallocated slots, and serves batches whose rows each name their own adapter.
"""

from engine_plugin.engine import ResidentEngine
from engine_plugin.residency import EvictionPolicy, HostTier, LRUPolicy, SlotTable
from engine_plugin.sources import LocalPackSource, PackSource, ResidencySink

__all__ = [
    "EvictionPolicy",
    "HostTier",
    "LRUPolicy",
    "LocalPackSource",
    "PackSource",
    "ResidencySink",
    "ResidentEngine",
    "SlotTable",
]
