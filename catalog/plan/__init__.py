"""Capacity planning: how many GPU slots, how much host memory and NVMe for a workload.

``workload`` (traces and synthetic workloads), ``stack`` (LRU for every capacity in one pass),
``tiers`` (the GPU -> host -> NVMe -> durable hierarchy), ``curves`` (every policy and Belady
per capacity, replayed by the numba kernels of ``compiled``), ``profile`` (what a load from each
tier costs), ``planner`` (the search and the JSON document), ``html`` (the report page). Nothing
here imports torch.
"""

from catalog.plan.planner import Costs, PlanRequest, build_plan
from catalog.plan.profile import DEFAULT_PROFILE, TierProfile, TransferCost, load_profile
from catalog.plan.tiers import Configuration
from catalog.plan.workload import Workload, parse_trace, read_trace, synthetic_workload

__all__ = [
    "DEFAULT_PROFILE",
    "Configuration",
    "Costs",
    "PlanRequest",
    "TierProfile",
    "TransferCost",
    "Workload",
    "build_plan",
    "load_profile",
    "parse_trace",
    "read_trace",
    "synthetic_workload",
]
