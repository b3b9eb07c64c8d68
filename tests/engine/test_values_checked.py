"""Staging trusts a source's finite check only where it may (see ``engine_plugin.staging``)."""

from __future__ import annotations

import pytest
import torch

from catalog.errors import InvalidPack
from catalog.pack import read_pack
from engine_plugin import LocalPackSource
from engine_plugin.sources import fetch_checked
from engine_plugin.staging import stage_pack
from tests.cache.test_values_finite import finite_pack


def test_staging_skips_the_finite_check_only_for_vouched_unconverted_tensors() -> None:
    data = finite_pack(nan_in="lora_B")
    pack = read_pack(data)
    revision = LocalPackSource().publish("t/nan", data)
    # Not vouched for: refused, as always.
    with pytest.raises(InvalidPack, match="NaN"):
        stage_pack(revision, pack, dtype=torch.float32, borrow=True)
    # Vouched for and staged in the pack's dtype: not checked again (the catalog's check and
    # the chunk checksums stand for it; this pack could never carry the flag).
    stage_pack(revision, pack, dtype=torch.float32, borrow=True, values_checked=True)
    # Converted: checked whatever the source says (a narrower dtype can overflow).
    with pytest.raises(InvalidPack, match="NaN"):
        stage_pack(revision, pack, dtype=torch.bfloat16, values_checked=True)


def test_a_source_without_fetch_checked_is_never_vouched_for() -> None:
    source = LocalPackSource()
    revision = source.publish("t/plain", finite_pack())
    data, checked = fetch_checked(source, revision)
    assert bytes(data) == finite_pack() and checked is False
