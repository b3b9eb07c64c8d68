"""How ``bench/bench_lora_kernels.py`` turns per-group timings into one whole kernel config."""

from __future__ import annotations

import argparse
from typing import Any

from bench.bench_lora_kernels import (
    ALWAYS_FUSED,
    Case,
    Group,
    layer_groups,
    rank_whole_configs,
    step_us,
    variant_key,
    variants,
)
from engine_plugin.lora_kernels import KernelConfig

DECODE = Case("0.5b", 8, 1)


def measured(times: dict[str, dict[str, float]], base_us: float = 10.0) -> dict[str, Any]:
    return {
        group: {"base_us": base_us, "variants": {k: {"us": us} for k, us in by_variant.items()}}
        for group, by_variant in times.items()
    }


def timings(
    fused_us: float, split_us: float, overlapped_us: float | None = None
) -> dict[str, float]:
    """Every variant at warps 4: fused ones at ``fused_us`` (block 256 a little faster), split
    ones at ``split_us`` (overlapped: ``overlapped_us``, else the same)."""
    out = {}
    for config in variants():
        if config.fused_max_k == ALWAYS_FUSED:
            us = fused_us - (0.5 if config.fused_block_k == 256 else 0)
        elif config.overlap and overlapped_us is not None:
            us = overlapped_us
        else:
            us = split_us
        out[variant_key(config)] = us
    return out


def test_the_engines_groups_for_the_05b_shape() -> None:
    layers, groups = layer_groups("0.5b")
    assert layers == 24
    assert [(g.name, g.k, g.widths) for g in groups] == [
        ("q/k/v", 896, (896, 128, 128)),
        ("o", 896, (896,)),
        ("gate/up", 896, (4864, 4864)),
        ("down", 4864, (896,)),
    ]


def test_the_best_whole_config_splits_only_the_wide_input() -> None:
    groups = [Group("narrow", 896, (896,)), Group("wide", 4864, (896,))]
    m = measured({"narrow": timings(fused_us=3, split_us=6), "wide": timings(12, 5)})
    per_case = {"c": {"case": Case("0.5b", 8, 1), "layers": 2, "groups": groups, "m": m}}
    ranked = rank_whole_configs(per_case, argparse.Namespace(more_warps=()), quiet=True)
    best = KernelConfig.parse(ranked["best"])
    assert 896 <= best.fused_max_k < 4864
    assert best.fused_block_k == 256
    # narrow fused 2.5 us, wide split 5 us, two layers each, over 2 x 2 x 10 us of base
    assert ranked["ratios"][ranked["best"]]["c"] == (2 * 2.5 + 2 * 5) / 40


def test_a_config_with_an_unmeasured_or_wrong_variant_is_not_scored() -> None:
    groups = [Group("g", 896, (896,))]
    times = timings(3, 6)
    times[variant_key(KernelConfig(fused_max_k=ALWAYS_FUSED, fused_block_k=256))] = float("nan")
    m = measured({"g": times})
    fused_256 = KernelConfig(fused_max_k=ALWAYS_FUSED, fused_block_k=256)
    assert step_us(fused_256, DECODE, 1, groups, m) is None
    assert step_us(KernelConfig(fused_max_k=0, split_chunk=512), DECODE, 1, groups, m) == 6
    warps_8 = KernelConfig(fused_max_k=0, num_warps=8)
    assert step_us(warps_8, DECODE, 1, groups, m) is None


def test_the_overlapped_split_is_chosen_where_it_is_faster() -> None:
    groups = [Group("narrow", 896, (896,)), Group("wide", 4864, (896,))]
    m = measured({"narrow": timings(3, 6, overlapped_us=2), "wide": timings(12, 5, 4)})
    per_case = {"c": {"case": Case("0.5b", 8, 1), "layers": 1, "groups": groups, "m": m}}
    ranked = rank_whole_configs(per_case, argparse.Namespace(more_warps=()), quiet=True)
    best = KernelConfig.parse(ranked["best"])
    assert (best.fused_max_k, best.overlap) == (0, 1)
    assert ranked["ratios"][ranked["best"]]["c"] == (2 + 4) / 20
    assert ranked["default_ratios"]["c"] == (2.5 + 5) / 20


def test_prefill_rows_can_take_the_split_kernels_while_decode_stays_fused() -> None:
    groups = [Group("g", 896, (896,))]
    decode = measured({"g": timings(fused_us=3, split_us=6)})
    prefill = measured({"g": timings(fused_us=9, split_us=5)})
    per_case = {
        "decode": {"case": DECODE, "layers": 1, "groups": groups, "m": decode},
        "prefill": {"case": Case("0.5b", 8, 128), "layers": 1, "groups": groups, "m": prefill},
    }
    ranked = rank_whole_configs(per_case, argparse.Namespace(more_warps=()), quiet=True)
    best = KernelConfig.parse(ranked["best"])
    assert best.fused_max_k >= 896 and best.split_from_tokens == 16
    assert ranked["ratios"][ranked["best"]] == {"decode": 2.5 / 10, "prefill": 5 / 10}
