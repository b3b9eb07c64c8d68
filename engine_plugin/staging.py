"""Packs decoded into host tensors laid out the way the slot pool holds them.

Staging is the one conversion between the pack format and the engine: it runs once per pack
when the pack enters the host tier (off the attach path), so that attaching is nothing but one
copy per stacked tensor. Two things happen here and nowhere else:

* dtype conversion to the resident base's dtype (a BF16 pack on an fp32 base, say);
* ``lora_B`` is transposed from the pack's ``[L, out, r]`` to ``[L, r, out]``, because the
  forward pass multiplies by ``B^T`` with the slots' ranks side by side (see ``layers``).

Staged tensors are contiguous, checked finite (a NaN in one slot must never leak into another
row's result through a masked product), and live in pinned memory when asked, so host-to-device
copies can be asynchronous.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property

import torch

from catalog.errors import InvalidPack
from catalog.model import Revision
from catalog.pack import Pack, TensorBytes

#: safetensors dtype names of the pack format -> torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}


@dataclass(frozen=True)
class StagedModule:
    """One target module of a staged adapter.

    ``lora_a`` is ``[len(layers), rank, in]`` and ``lora_bt`` ``[len(layers), rank, out]``
    (``lora_B`` transposed). ``scaling`` is what PEFT multiplies ``B @ A`` by.
    """

    name: str
    rank: int
    scaling: float
    layers: tuple[int, ...]
    lora_a: torch.Tensor
    lora_bt: torch.Tensor

    @cached_property
    def nbytes(self) -> int:
        return tensor_nbytes(self.lora_a) + tensor_nbytes(self.lora_bt)


@dataclass(frozen=True)
class StagedAdapter:
    """A whole revision in host memory, ready to be copied into a slot."""

    revision: Revision
    modules: dict[str, StagedModule]
    nbytes: int
    pinned: bool

    @cached_property
    def digest(self) -> str:
        return str(self.revision.digest)


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


def _materialize(source: torch.Tensor, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    out = torch.empty(source.shape, dtype=dtype, pin_memory=pin_memory)
    out.copy_(source)
    return out


def stage_pack(
    revision: Revision, pack: Pack, *, dtype: torch.dtype, pin_memory: bool = False
) -> StagedAdapter:
    """Convert a validated pack into host tensors in slot layout.

    Raises:
        InvalidPack: a tensor holds NaN or infinite values, or the pack has expert modules
            (the engine has no expert slots).
    """
    manifest = pack.manifest
    modules: dict[str, StagedModule] = {}
    total = 0
    for spec in manifest.modules:
        if spec.num_experts:
            raise InvalidPack(
                f"module {spec.name!r} of {revision.adapter}@{revision.number} is an expert "
                "(MoE) LoRA; this engine serves dense adapters only"
            )
        raw_a, raw_b = (tensor_from_bytes(t) for t in pack.module_tensors(spec.name))
        lora_a = _materialize(raw_a, dtype, pin_memory)
        lora_bt = _materialize(raw_b.transpose(1, 2), dtype, pin_memory)
        for label, tensor in (("lora_A", lora_a), ("lora_B", lora_bt)):
            # max |x| is NaN or inf exactly when some element is; ~10x faster than isfinite().all()
            if tensor.numel() and not math.isfinite(float(tensor.abs().amax())):
                raise InvalidPack(
                    f"{label} of module {spec.name!r} in {revision.adapter}@{revision.number} "
                    f"holds NaN or infinite values (after conversion to {dtype})"
                )
        module = StagedModule(
            name=spec.name,
            rank=spec.rank,
            scaling=manifest.scaling(spec.name),
            layers=spec.layers,
            lora_a=lora_a,
            lora_bt=lora_bt,
        )
        modules[spec.name] = module
        total += module.nbytes
    return StagedAdapter(revision=revision, modules=modules, nbytes=total, pinned=pin_memory)
