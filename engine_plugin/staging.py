"""Packs decoded into host tensors laid out the way the slot pool holds them.

Staging is the one conversion between the pack format and the engine: it runs once per pack
when the pack enters the host tier (off the attach path), so that attaching is nothing but one
copy per stacked tensor. Two things happen here and nowhere else:

* dtype conversion to the resident base's dtype (a BF16 pack on an fp32 base, say);
* ``lora_B`` is held transposed, ``[L, r, out]``, because the forward pass multiplies by
  ``B^T`` with the slots' ranks side by side (see ``layers``); expert modules likewise
  ``[L, E, r, out]``. Packs of format 2 store it so (rank-major, ``catalog.pack.format``): no
  work here, and a slot write is a plain copy; format-1 packs store PEFT's ``[L, out, r]`` and
  are transposed here (or by the slot write, ``borrow_b``);
* pack modules are routed to the engine's slot modules (:class:`SlotRoute`): a dense module
  to itself, an expert module to its projection's slots, a fused ``gate_up_proj`` to gate and
  up slots with ``lora_B``'s row halves and one shared ``lora_A`` (see ``experts``).

Staged tensors are contiguous (borrowed strided ``lora_B`` views excepted), checked finite (a
NaN in one slot must never leak into another row's result through a masked product; here, or
once by the catalog when the source vouches for it, ``values_checked``), and live in pinned
memory when asked, so host-to-device copies can be asynchronous. Without pinning, a tensor that
needs no conversion may *borrow* the pack's own bytes (a read-only view, when the caller vouches
that the buffer never changes): ``lora_A``, and a rank-major ``lora_B`` (format 2) whose rows
all go to one slot module. Fresh host allocations are what staging costs most on these
machines. A fetch that goes straight into a slot on CPU may borrow the rest of ``lora_B`` too,
as a strided view (``borrow_b``: a format-1 pack's ``lora_B`` transposed, or a fused expert
module's row half): nothing is copied here, the slot write gathers, and every byte is touched
once instead of twice (stage, then copy); such a slot write costs ~1.5x a plain one on two
threads (``shared_work``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import cached_property

import torch

from catalog.errors import InvalidPack
from catalog.model import Revision
from catalog.pack import ModuleSpec, Pack, TensorBytes
from engine_plugin.shared_work import first_axis_spans, run_shared

#: safetensors dtype names of the pack format -> torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}


@dataclass(frozen=True)
class SlotRoute:
    """Where (part of) a pack module goes: slot module ``slot_module`` takes all of
    ``lora_A`` and the ``lora_B`` rows (output features) ``rows`` (``(start, stop)``; None for
    all of them)."""

    slot_module: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class StagedModule:
    """One slot module's part of a staged adapter.

    ``lora_a`` is ``[len(layers), rank, in]`` and ``lora_bt`` ``[len(layers), rank, out]``
    (``lora_B`` transposed), or ``[len(layers), E, rank, in]`` / ``[len(layers), E, rank, out]``
    for an expert projection. ``scaling`` is what PEFT multiplies ``B @ A`` by. ``name`` is the
    slot module it fills; ``source`` the pack module it came from.
    """

    name: str
    rank: int
    scaling: float
    layers: tuple[int, ...]
    lora_a: torch.Tensor
    lora_bt: torch.Tensor
    source: str = ""

    @cached_property
    def nbytes(self) -> int:
        return tensor_nbytes(self.lora_a) + tensor_nbytes(self.lora_bt)


@dataclass(frozen=True)
class StagedAdapter:
    """A whole revision in host memory, ready to be copied into a slot; ``nbytes`` counts each
    host tensor once (modules routed from one pack module share its ``lora_A``)."""

    revision: Revision
    modules: dict[str, StagedModule]
    nbytes: int
    pinned: bool
    #: Staged ``flat``: the one buffer (as 2-byte words, pinned on CUDA) every tensor is a view
    #: of, so a slot write is one host-to-device copy (see ``slot_copy``).
    flat: torch.Tensor | None = None

    @cached_property
    def digest(self) -> str:
        return str(self.revision.digest)

    @cached_property
    def layout_key(self) -> str | None:
        """Which modules at which rank this adapter fills, as a string (its hash is cached, so
        it is a cheap dictionary key); None when a module's layers are not ``0..n-1``."""
        if any(m.layers != tuple(range(len(m.layers))) for m in self.modules.values()):
            return None
        return "|".join(f"{name}:{m.rank}:{len(m.layers)}" for name, m in self.modules.items())

    @cached_property
    def copied_nbytes(self) -> int:
        """Bytes one attach copies into a slot (shared host tensors count once per use)."""
        return sum(m.nbytes for m in self.modules.values())

    @cached_property
    def copy_sources(self) -> list[torch.Tensor]:
        """Every host tensor to copy into a slot, in ``modules`` order, ``lora_a`` first."""
        return [t for m in self.modules.values() for t in (m.lora_a, m.lora_bt)]


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def tensor_from_bytes(tb: TensorBytes) -> torch.Tensor:
    """A zero-copy, read-only torch view of pack tensor bytes.

    Raises:
        InvalidPack: the dtype is not one a pack may hold.
    """
    try:
        dtype = TORCH_DTYPES[tb.dtype]
    except KeyError:
        raise InvalidPack(f"pack dtype {tb.dtype!r} is not one of {sorted(TORCH_DTYPES)}") from None
    if tb.data.nbytes == 0:
        return torch.empty(tb.shape, dtype=dtype)
    with warnings.catch_warnings():
        # The pack buffer is read-only bytes; we only ever read through this view.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(tb.data, dtype=dtype)
    return flat.view(tb.shape)


#: Elements of one piece of shared finite checks (~0.1 ms of aminmax).
_CHECK_PIECE = 1 << 20

#: Staged tensors start at multiples of this many bytes of a pinned arena.
_ALIGN = 16


class _Arena:
    """One allocation (pinned on CUDA) that a staged adapter's tensors are carved from."""

    def __init__(self, nbytes: int, pin_memory: bool) -> None:
        self.buffer = torch.empty(max(nbytes, _ALIGN), dtype=torch.uint8, pin_memory=pin_memory)
        self.used = 0

    @staticmethod
    def footprint(shape: torch.Size, dtype: torch.dtype) -> int:
        """Bytes ``take`` uses for a tensor: its own, rounded up to ``_ALIGN``."""
        return -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        out = self.buffer[self.used : self.used + nbytes].view(dtype).view(shape)
        self.used += self.footprint(shape, dtype)
        return out


def _materialize(
    source: torch.Tensor, dtype: torch.dtype, pin_memory: bool, arena: _Arena | None
) -> torch.Tensor:
    # Plain allocations: staging into pre-populated huge-page buffers (catalog.hostmem) measured
    # slower here (MoE stage 5.9 -> 7.1 ms at 64 experts), the kernel compacting memory for them.
    if arena is not None:
        out = arena.take(source.shape, dtype)
    else:
        out = torch.empty(source.shape, dtype=dtype, pin_memory=pin_memory)
    out.copy_(source)
    return out


def _check_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    # min and max are both finite exactly when every element is (NaN propagates): one pass
    # without a temporary, ~30x faster than isfinite().all() and ~10x than abs().amax() (bf16).
    if tensor.numel() and not all(math.isfinite(float(x)) for x in torch.aminmax(tensor)):
        raise InvalidPack(f"{what} holds NaN or infinite values (after conversion to {dtype})")


def _check_all_finite(
    checks: list[tuple[torch.Tensor, str]], dtype: torch.dtype, helper: Executor | None
) -> None:
    """Every check of ``checks``; the first failing one (in order) raises. With ``helper``,
    the checks are cut into pieces that this thread and the helper share (aminmax releases
    the GIL; see ``shared_work``)."""
    if helper is None:
        for tensor, what in checks:
            _check_finite(tensor, what, dtype)
        return
    pieces = [
        functools.partial(_check_finite, tensor[start:stop], what, dtype)
        for tensor, what in checks
        for start, stop in first_axis_spans(
            len(tensor), tensor[0].numel() if len(tensor) else 0, _CHECK_PIECE
        )
    ]
    run_shared(pieces, helper)


def stage_pack(
    revision: Revision,
    pack: Pack,
    *,
    dtype: torch.dtype,
    pin_memory: bool = False,
    routes: Mapping[str, Sequence[SlotRoute]] | None = None,
    borrow: bool = False,
    borrow_b: bool = False,
    flat: bool = False,
    helper: Executor | None = None,
    values_checked: bool = False,
) -> StagedAdapter:
    """Convert a validated pack into host tensors in slot layout.

    ``routes`` maps pack modules to the slot modules they fill; a module it does not name goes
    to the slot module of its own name, unless it is an expert module. With ``borrow`` (and no
    pinning), ``lora_A`` tensors already in ``dtype``, and ``lora_bt`` tensors that are the
    pack's bytes as they are (rank-major, whole), are read-only views of the pack's buffer,
    which must then stay unchanged for as long as the staged adapter lives; with ``borrow_b``
    as well, every ``lora_bt`` in ``dtype`` is such a view (strided where the pack's layout is
    not the slot's). With ``flat``
    every tensor is carved from one buffer (``StagedAdapter.flat``), so that a slot write is
    one copy of it (``slot_copy``). ``helper``: a thread that takes half of the finite checks.
    ``values_checked``: the pack's source vouches that its values are all finite (a colocated
    read of a tier entry the catalog checked, see ``catalog.cache.layout``); tensors staged in
    their pack dtype are then not checked again (a converted one still is: a conversion to a
    narrower dtype can overflow).

    Raises:
        InvalidPack: a tensor holds NaN or infinite values, an expert module has no route,
            or two routes fill one slot module.
    """
    manifest = pack.manifest
    where = f"{revision.adapter}@{revision.number}"
    modules: dict[str, StagedModule] = {}
    total = 0
    # Routes and sources first, so that a flat arena is sized before anything is copied.
    planned: list[tuple[ModuleSpec, torch.Tensor, list[tuple[SlotRoute, torch.Tensor]]]] = []
    for spec in manifest.modules:
        spec_routes = routes.get(spec.name) if routes is not None else None
        if spec_routes is None:
            if spec.num_experts:
                raise InvalidPack(
                    f"module {spec.name!r} of {where} is an expert (MoE) LoRA and no expert "
                    "slots of this engine take it"
                )
            spec_routes = (SlotRoute(spec.name),)
        stored_a, stored_b, rank_major = pack.stored_tensors(spec.name)
        raw_a = tensor_from_bytes(stored_a)
        # lora_B transposed: the pack's own bytes when it is stored rank-major (format 2), a
        # transposed view of them when stored as PEFT has it (format 1).
        raw_bt = tensor_from_bytes(stored_b)
        if not rank_major:
            raw_bt = raw_bt.transpose(-1, -2)
        parts = [
            (
                route,
                raw_bt
                if route.rows is None
                else raw_bt.narrow(-1, route.rows[0], route.rows[1] - route.rows[0]),
            )
            for route in spec_routes
        ]
        planned.append((spec, raw_a, parts))
    arena = None
    if flat:
        sources = [t for _, raw_a, parts in planned for t in (raw_a, *(b for _, b in parts))]
        arena = _Arena(sum(_Arena.footprint(t.shape, dtype) for t in sources), pin_memory)
    borrowing = borrow and not pin_memory and not flat
    checks: list[tuple[torch.Tensor, str]] = []
    for spec, raw_a, parts in planned:
        if borrowing and raw_a.dtype == dtype:
            lora_a = raw_a
        else:
            lora_a = _materialize(raw_a, dtype, pin_memory, arena)
        if not (values_checked and raw_a.dtype == dtype):
            checks.append((lora_a, f"lora_A of module {spec.name!r} in {where}"))
        total += tensor_nbytes(lora_a)
        for route, rows in parts:
            # Borrowed as lora_A is when it is the pack's bytes as they are (rank-major, all
            # rows); with borrow_b also as a strided view, which the slot write then gathers.
            contiguous = rows.is_contiguous()
            if borrowing and (borrow_b or contiguous) and rows.dtype == dtype:
                lora_bt = rows
                # The same values, read in memory order (format 1: the stored [L, out, r]).
                checked = rows if rows.stride(-1) == 1 else rows.transpose(-1, -2)
            else:
                lora_bt = checked = _materialize(rows, dtype, pin_memory, arena)
            if not (values_checked and rows.dtype == dtype):
                checks.append((checked, f"lora_B of module {spec.name!r} in {where}"))
            if route.slot_module in modules:
                raise InvalidPack(
                    f"modules {modules[route.slot_module].source!r} and {spec.name!r} of {where} "
                    f"both adapt {route.slot_module!r}"
                )
            modules[route.slot_module] = StagedModule(
                name=route.slot_module,
                rank=spec.rank,
                scaling=manifest.scaling(spec.name),
                layers=spec.layers,
                lora_a=lora_a,
                lora_bt=lora_bt,
                source=spec.name,
            )
            total += tensor_nbytes(lora_bt)
    _check_all_finite(checks, dtype, helper)
    words = arena.buffer[: arena.used].view(torch.int16) if arena is not None else None
    return StagedAdapter(
        revision=revision, modules=modules, nbytes=total, pinned=pin_memory, flat=words
    )
