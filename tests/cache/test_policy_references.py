"""The compiled replays' comments name the Python policy code they mirror; those names must exist.

``catalog/plan/compiled/*.py`` says which Python method each block reproduces
(``SizeAwareLRFU._count``, ``WTinyLFU._choose_victims``, ...) and which module defines it, and
the cache's modules point at each other the same way. A rename or a move that forgets them
leaves a reader comparing against code that is not there; this test fails instead.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from catalog.cache import policies
from catalog.cache.lazy_heap import LazyMinHeap

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    [*(ROOT / "catalog/plan/compiled").glob("*.py"), *(ROOT / "catalog/cache").glob("*.py")]
)

#: ``Class.attribute`` for the classes the compiled replays mirror.
CLASS_ATTRIBUTE = re.compile(
    r"\b(EvictionPolicy|HeapRankedPolicy|LRU|S3FIFO|WTinyLFU|FrequencyCounter|GDSF|"
    r"SizeAwareLRFU|LazyMinHeap)\.([A-Za-z_]\w*)"
)
#: A dotted name inside the cache package: a module, maybe followed by one of its attributes.
CACHE_NAME = re.compile(r"\bcatalog\.cache\.([a-z_]+)(?:\.([A-Za-z_]\w*))?")


def instances() -> dict[str, object]:
    """One object per class, so that attributes set in ``__init__`` count too."""
    found: dict[str, object] = {
        name: policies.make_policy(name, 1000) for name in policies.POLICIES
    }
    by_class = {type(policy).__name__: policy for policy in found.values()}
    by_class["FrequencyCounter"] = policies.FrequencyCounter(10)
    by_class["LazyMinHeap"] = LazyMinHeap()
    by_class["EvictionPolicy"] = policies.EvictionPolicy  # abstract: its class attributes
    by_class["HeapRankedPolicy"] = policies.HeapRankedPolicy
    return by_class


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_named_policy_code_exists(source: Path) -> None:
    text = source.read_text()
    objects = instances()
    missing = [
        f"{cls}.{attribute}"
        for cls, attribute in CLASS_ATTRIBUTE.findall(text)
        if not hasattr(objects[cls], attribute)
    ]
    for module_name, attribute in CACHE_NAME.findall(text):
        try:
            module = importlib.import_module(f"catalog.cache.{module_name}")
        except ModuleNotFoundError:
            missing.append(f"catalog.cache.{module_name}")
            continue
        if attribute and not hasattr(module, attribute):
            missing.append(f"catalog.cache.{module_name}.{attribute}")
    assert not missing, f"{source.name} names code that does not exist: {missing}"


def test_the_references_are_found() -> None:
    """The patterns above still match the comments they are meant to check."""
    text = (ROOT / "catalog/plan/compiled/greedy_dual.py").read_text()
    assert ("SizeAwareLRFU", "_count") in CLASS_ATTRIBUTE.findall(text)
    assert ("size_aware_policies", "") in CACHE_NAME.findall(text)
