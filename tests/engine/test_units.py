"""The parts on their own: eviction policy, slot table, host tier, slot pool, batched ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from catalog.digest import Digest
from catalog.model import AdapterName, Revision
from engine_plugin.layers import (
    BatchContext,
    MultiLoRALinear,
    add_gathered,
    add_wide,
    plan_batch,
)
from engine_plugin.residency import HostTier, LRUPolicy, SlotsExhausted, SlotState, SlotTable
from engine_plugin.slots import SlotPool, TargetModule
from engine_plugin.staging import StagedAdapter, StagedModule


def revision(n: int, rank: int = 4) -> Revision:
    return Revision(
        adapter=AdapterName("t", f"a{n}"),
        number=1,
        digest=Digest.of(str(n).encode()),
        base_id="b",
        rank=rank,
        alpha=8.0,
        dtype="F32",
        size_bytes=1,
        created_at=0.0,
    )


def staged(n: int, modules: dict[str, StagedModule], nbytes: int | None = None) -> StagedAdapter:
    total = sum(m.nbytes for m in modules.values()) if nbytes is None else nbytes
    return StagedAdapter(revision(n), modules, total, pinned=False)


def test_lru_policy_order_and_filter() -> None:
    lru: LRUPolicy[str] = LRUPolicy()
    for key in "abc":
        lru.touch(key)
    lru.touch("a")
    assert lru.victim(lambda k: True) == "b"
    assert lru.victim(lambda k: k != "b") == "c"
    lru.forget("b")
    lru.forget("zzz")
    assert lru.victim(lambda k: True) == "c"
    assert lru.victim(lambda k: False) is None


def test_slot_table_claims_lowest_free_then_lru_idle() -> None:
    table = SlotTable(2)
    first, evicted = table.claim(revision(1))
    assert (first.slot, evicted, first.leases, first.state) == (0, None, 1, SlotState.LOADING)
    second, _ = table.claim(revision(2))
    with pytest.raises(SlotsExhausted):
        table.claim(revision(3))  # both slots are loading and leased
    for entry in (first, second):
        entry.state = SlotState.READY
        table.unlease(entry)
    table.lease(first)  # busy again, and the most recently used
    third, evicted = table.claim(revision(3))
    assert evicted is second and third.slot == second.slot == 1
    assert table.get(second.digest) is None
    with pytest.raises(RuntimeError):
        table.unlease(second)


def test_slot_table_exhausted_message_names_the_culprits() -> None:
    table = SlotTable(1)
    entry, _ = table.claim(revision(1))
    entry.state = SlotState.READY
    with pytest.raises(SlotsExhausted, match=r"all 1 adapter slots.*t/a1@1"):
        table.claim(revision(2))
    table.unlease(entry)
    entry.pinned = True
    with pytest.raises(SlotsExhausted, match=r"pinned: t/a1@1"):
        table.claim(revision(2))


def test_host_tier_budget_and_oversize() -> None:
    tier = HostTier(100)
    assert tier.put(staged(1, {}, 40)) == []
    assert tier.put(staged(2, {}, 40)) == []
    assert tier.get(str(revision(1).digest)) is not None  # 1 is now most recent
    evicted = tier.put(staged(3, {}, 40))
    assert evicted == [str(revision(2).digest)]
    assert tier.nbytes == 80 and len(tier) == 2
    assert tier.put(staged(4, {}, 101)) == [] and str(revision(4).digest) not in tier
    assert tier.get("sha256:" + "0" * 64) is None
    assert (tier.counters.hits, tier.counters.misses, tier.counters.evictions) == (1, 1, 1)


def make_pool(num_slots: int = 3, max_rank: int = 4, layers: int = 2) -> SlotPool:
    targets = {"m": TargetModule("m", 5, 6, layers)}
    return SlotPool(targets, num_slots, max_rank, torch.float32, torch.device("cpu"))


def module(rank: int, layers: tuple[int, ...], seed: int, scaling: float = 0.5) -> StagedModule:
    gen = torch.Generator().manual_seed(seed)
    return StagedModule(
        name="m",
        rank=rank,
        scaling=scaling,
        layers=layers,
        lora_a=torch.randn(len(layers), rank, 5, generator=gen),
        lora_bt=torch.randn(len(layers), rank, 6, generator=gen),
    )


def test_pool_write_pads_and_clear_zeroes() -> None:
    pool = make_pool()
    m = module(rank=2, layers=(0, 1), seed=1, scaling=3.0)
    moved = pool.write(1, staged(1, {"m": m}))
    slots = pool.modules["m"]
    assert moved == m.nbytes
    assert torch.equal(slots.lora_a[:, 1, :2], m.lora_a)
    assert torch.equal(slots.lora_bt[:, 1, :2], m.lora_bt)
    assert not slots.lora_a[:, 1, 2:].any() and slots.scalings[1] == 3.0
    assert pool.is_clear(0) and pool.is_clear(pool.zero_slot)
    generation = pool.generation
    pool.clear(1)
    assert pool.is_clear(1) and pool.generation > generation


def test_pool_write_subset_of_layers() -> None:
    pool = make_pool(layers=3)
    m = module(rank=4, layers=(2,), seed=2)
    pool.write(0, staged(1, {"m": m}))
    slots = pool.modules["m"]
    assert torch.equal(slots.lora_a[2, 0], m.lora_a[0])
    assert not slots.lora_a[:2, 0].any()


def test_pool_write_reuses_slot_views_per_layout_without_mixing_tenants() -> None:
    # The second write of a layout takes the cached slot views: it must still land each
    # adapter's own weights and scale in its own slot, and a clear must zero them.
    pool = make_pool(layers=2)
    first = staged(1, {"m": module(rank=2, layers=(0, 1), seed=1, scaling=1.0)})
    second = staged(2, {"m": module(rank=2, layers=(0, 1), seed=2, scaling=5.0)})
    slots = pool.modules["m"]
    for slot, adapter in ((0, first), (1, second), (0, second), (1, first)):
        pool.clear(slot)
        pool.write(slot, adapter)
        want = adapter.modules["m"]
        assert torch.equal(slots.lora_a[:, slot, :2], want.lora_a)
        assert torch.equal(slots.lora_bt[:, slot, :2], want.lora_bt)
        assert slots.scalings[slot] == want.scaling and slots.ranks[slot] == 2
    # A prefix of the layers has a layout key too, but the pool scatters it every time.
    short = staged(3, {"m": module(rank=2, layers=(0,), seed=3)})
    for _ in range(2):
        pool.clear(0)
        pool.write(0, short)
        assert torch.equal(slots.lora_a[0, 0, :2], short.modules["m"].lora_a[0])
        assert not slots.lora_a[1, 0].any()


def two_module_pool() -> SlotPool:
    targets = {name: TargetModule(name, 5, 6, 3) for name in ("m", "n")}
    return SlotPool(targets, 2, 4, torch.float32, torch.device("cpu"))


def named(name: str, rank: int, layers: tuple[int, ...], seed: int) -> StagedModule:
    m = module(rank, layers, seed, scaling=float(seed))
    return StagedModule(name, m.rank, m.scaling, m.layers, m.lora_a, m.lora_bt)


FULL = (0, 1, 2)
TENANTS = {
    "both-r4": {"m": named("m", 4, FULL, 1), "n": named("n", 4, FULL, 2)},
    "both-r1": {"m": named("m", 1, FULL, 3), "n": named("n", 1, FULL, 4)},
    "m-r2": {"m": named("m", 2, FULL, 5)},
    "n-r3-some-layers": {"n": named("n", 3, (1, 2), 6)},
}


@pytest.mark.parametrize("old", sorted(TENANTS))
@pytest.mark.parametrize("new", sorted(TENANTS))
def test_replace_leaves_the_slot_as_clear_then_write(old: str, new: str) -> None:
    # Evicting zeroes only what the new tenant does not overwrite: the result must be the
    # same bytes, ranks and scales as zeroing everything first.
    got, want = two_module_pool(), two_module_pool()
    for pool in (got, want):
        pool.write(0, staged(1, TENANTS[old]))
        pool.write(1, staged(3, TENANTS["both-r4"]))  # a neighbour that must stay intact
    got.replace(0, staged(2, TENANTS[new]))
    want.clear(0)
    want.write(0, staged(2, TENANTS[new]))
    for name in ("m", "n"):
        g, w = got.modules[name], want.modules[name]
        assert torch.equal(g.lora_a, w.lora_a) and torch.equal(g.lora_bt, w.lora_bt)
        assert g.ranks == w.ranks and g.scalings == w.scalings


@pytest.mark.parametrize("tokens", [1, 3, 7])
def test_gather_and_wide_equal_a_per_row_loop(tokens: int) -> None:
    torch.manual_seed(0)
    pool = make_pool(num_slots=3, max_rank=4, layers=2)
    pool.write(0, staged(1, {"m": module(4, (0, 1), seed=3, scaling=2.0)}))
    pool.write(2, staged(2, {"m": module(2, (0, 1), seed=4, scaling=0.25)}))
    row_slots = (2, pool.zero_slot, 0, 2, 1)  # slot 1 is empty: contributes nothing
    plan = plan_batch(pool, row_slots)
    slots = pool.modules["m"]
    module_plan = plan.modules["m"]
    assert module_plan is not None and module_plan.rank == 4
    assert module_plan.wide_slots == 3
    x = torch.randn(len(row_slots), tokens, 5)
    layer = 1
    expected = torch.zeros(len(row_slots), tokens, 6)
    for row, slot in enumerate(row_slots):
        a, bt = slots.lora_a[layer, slot], slots.lora_bt[layer, slot]
        expected[row] = slots.scalings[slot] * (x[row] @ a.t()) @ bt
    gathered = torch.zeros_like(expected)
    add_gathered(x, gathered, slots.lora_a[layer], slots.lora_bt[layer], module_plan, 5, tokens)
    wide = torch.zeros_like(expected)
    add_wide(x, wide, slots.lora_a[layer], slots.lora_bt[layer], module_plan, 5, tokens)
    torch.testing.assert_close(gathered, expected)
    torch.testing.assert_close(wide, expected)


def test_plan_skips_modules_no_row_adapts() -> None:
    pool = make_pool()
    plan = plan_batch(pool, (pool.zero_slot, 0))
    assert plan.modules == {"m": None}


def test_multi_lora_linear_without_plan_is_the_base() -> None:
    pool = make_pool()
    base = nn.Linear(5, 6)
    layer = MultiLoRALinear(base, pool.modules["m"], 0, BatchContext())
    x = torch.randn(2, 3, 5)
    assert torch.equal(layer(x), base(x))
    assert layer.weight is base.weight


def _address_range(buffer: bytes) -> tuple[int, int]:
    import numpy as np

    start = int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)
    return start, start + len(buffer)


@pytest.mark.parametrize("format_version", [1, 2])
@pytest.mark.parametrize("borrow", [True, False])
def test_staging_borrows_only_unconverted_contiguous_pack_bytes(
    borrow: bool, format_version: int
) -> None:
    """Borrowed ``lora_A`` views the pack's own bytes (no host allocation), and so does a
    rank-major ``lora_B`` (format 2, already the slot layout); a format-1 ``lora_B`` is a
    contiguous transposed copy unless ``borrow_b``, so attach copies stay plain memcpys."""
    from catalog.pack import ModuleSpec, PackManifest, TensorBytes, read_pack, write_pack
    from engine_plugin.staging import stage_pack

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 6, 3, generator=gen)
    manifest = PackManifest(
        base_id="b",
        rank=3,
        alpha=6.0,
        dtype="F32",
        use_rslora=False,
        num_layers=2,
        num_experts=0,
        modules=(ModuleSpec("m", 5, 6, 3, 6.0, (0, 1)),),
        source={},
        format_version=format_version,
    )
    stored_b = b.transpose(1, 2).contiguous() if format_version == 2 else b
    tensors = {
        f"layers.m.lora_{side}": TensorBytes("F32", tuple(t.shape), memoryview(t.numpy().tobytes()))
        for side, t in (("A", a), ("B", stored_b))
    }
    data = write_pack(manifest, tensors)
    staged = stage_pack(revision(1), read_pack(data), dtype=torch.float32, borrow=borrow)
    m = staged.modules["m"]
    assert torch.equal(m.lora_a, a) and torch.equal(m.lora_bt, b.transpose(1, 2))
    assert m.lora_bt.is_contiguous()
    low, high = _address_range(data)
    assert (low <= m.lora_a.data_ptr() < high) == borrow
    assert (low <= m.lora_bt.data_ptr() < high) == (borrow and format_version == 2)
    converted = stage_pack(revision(1), read_pack(data), dtype=torch.bfloat16, borrow=True)
    assert not low <= converted.modules["m"].lora_a.data_ptr() < high
    assert not low <= converted.modules["m"].lora_bt.data_ptr() < high


@pytest.mark.parametrize("format_version", [1, 2])
def test_every_staging_holds_the_same_slot_layout_in_either_format(format_version: int) -> None:
    """Flat (the CUDA path's one arena, here on CPU), copied and borrowed stagings of a pack in
    either format hold the same ``lora_a`` / ``lora_bt``, all contiguous but the borrowed
    format-1 ``lora_bt`` (a transposed view the slot write gathers)."""
    from catalog.pack import convert_pack, read_pack
    from engine_plugin.staging import stage_pack
    from tests.pack.synth import small_pack

    data = convert_pack(small_pack(), format_version)
    reference = stage_pack(revision(1), read_pack(convert_pack(data, 2)), dtype=torch.float32)
    flat = stage_pack(revision(1), read_pack(data), dtype=torch.float32, flat=True)
    borrowed = stage_pack(
        revision(1),
        read_pack(memoryview(data).toreadonly()),
        dtype=torch.float32,
        borrow=True,
        borrow_b=True,
    )
    assert flat.flat is not None
    for name, expected in reference.modules.items():
        for staged in (flat, borrowed):
            got = staged.modules[name]
            assert torch.equal(got.lora_a, expected.lora_a), name
            assert torch.equal(got.lora_bt, expected.lora_bt), name
        assert flat.modules[name].lora_bt.is_contiguous()
        assert borrowed.modules[name].lora_bt.is_contiguous() == (format_version == 2)
