"""One fused launch per LoRA module: ``out[t] += scale[s] * (x[t] @ A[s]^T) @ B[s]^T``.

The eager paths of ``layers`` add a module's LoRA delta with four or five stock ops (gather or
mask, two matmuls, a scale), each a kernel launch. On a GPU a decode step of a small model is
bound by launches, not by bytes: the 0.5B shape's base launches ~1,000 kernels a step, and four
more per wrapped module (168 modules) made the engine 1.7x slower than its base. Here the whole
delta is one Triton kernel (the shrink ``x @ A^T`` and the expand ``h @ B^T`` of Punica's SGMV,
fused): a program takes ``BLOCK_M`` tokens of one row (so one slot, and ``tl.dot`` on the tensor
cores) and ``BLOCK_N`` output features; it recomputes the row's ``[BLOCK_M, R]`` shrink, which
costs ``K * R`` per token, small next to reading ``B``'s tile for shapes up to ``K`` ~ 16k.

Routing is read from device tensors only (``index``: each row's slot; ``scales``: each slot's
scale, 0 for the zero slot and for empty slots), never from the host. That is what lets a
CUDA graph capture the launch once and stay valid while adapters are attached, detached and
swapped: the engine rewrites those tensors in place (see ``graphs``). A row whose slot has
scale 0 returns at once, so base rows cost nothing but their program's start.

``add_lora`` picks the Triton kernel on CUDA (or under Triton's CPU interpreter, for tests) and
``add_lora_reference`` otherwise: the same sum with stock torch ops, the CPU path and the
reference the kernel is tested against.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

#: Off switch (``LORACAT_TRITON=0``): every device takes the torch path.
_DISABLED = os.environ.get("LORACAT_TRITON", "1") == "0"
#: Run the kernel on CPU tensors through Triton's interpreter (tests). Triton must have been
#: imported with ``TRITON_INTERPRET=1`` already: its own library functions are compiled or
#: interpreted from the moment it is imported (``tests/conftest.py`` sets it on CPU machines).
INTERPRET_ON_CPU = False


@functools.cache
def _triton() -> Any:
    """The ``triton`` module, or None where it is missing or unusable."""
    if _DISABLED:
        return None
    try:
        import triton
    except ImportError:
        return None
    return triton


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_available(device: torch.device) -> bool:
    """Whether ``add_lora`` runs the Triton kernel for tensors on ``device``."""
    if _triton() is None:
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and INTERPRET_ON_CPU and interpreting()


@functools.cache
def _kernel(interpret: bool) -> Any:
    """Build the kernel (Triton decides at decoration time whether to interpret)."""
    del interpret  # part of the cache key only
    triton = _triton()
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def fused_lora(  # type: ignore[no-untyped-def]
        x_ptr,
        out_ptr,
        a_ptr,
        bt_ptr,
        scale_ptr,
        index_ptr,
        tokens,
        k_features,
        n_features,
        m_blocks,
        stride_xt,
        stride_ot,
        stride_as,
        stride_ar,
        stride_bs,
        stride_br,
        stride_scale,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        row = pid_m // m_blocks
        slot = tl.load(index_ptr + row)
        scale = tl.load(scale_ptr + slot * stride_scale)
        if scale != 0.0:
            offs_m = (pid_m % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < tokens
            tok = row * tokens + offs_m
            offs_r = tl.arange(0, RANK_PAD)
            mask_r = offs_r < RANK
            a_base = a_ptr + slot * stride_as
            h = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
            for k0 in range(0, k_features, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < k_features
                x = tl.load(
                    x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0,
                )
                a_t = tl.load(
                    a_base + offs_r[None, :] * stride_ar + offs_k[:, None],
                    mask=mask_r[None, :] & mask_k[:, None],
                    other=0.0,
                )
                if IEEE:
                    h += tl.dot(x.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
                else:
                    h += tl.dot(x, a_t)
            h = (h * scale).to(bt_ptr.dtype.element_ty)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_features
            bt = tl.load(
                bt_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :],
                mask=mask_r[:, None] & mask_n[None, :],
                other=0.0,
            )
            if IEEE:
                delta = tl.dot(h.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
            else:
                delta = tl.dot(h, bt)
            out_ptrs = out_ptr + tok[:, None] * stride_ot + offs_n[None, :]
            mask_out = mask_m[:, None] & mask_n[None, :]
            current = tl.load(out_ptrs, mask=mask_out, other=0.0)
            tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=mask_out)

    return fused_lora


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_m(tokens: int) -> int:
    # tl.dot needs 16 rows at least; long rows (prefill) take 64 tokens a program.
    return 16 if tokens <= 16 else (32 if tokens <= 32 else 64)


def _block_n(n_features: int, k_features: int) -> int:
    # Each program recomputes its tokens' shrink (K * R): wide output tiles keep that
    # recomputation (and the reads of A it takes) to a few passes over A for large K.
    if k_features >= 2048 and n_features >= 2048:
        return 256
    return 128


def add_lora(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    scales: torch.Tensor,
    index: torch.Tensor,
    rows: int,
) -> None:
    """``out[b, t] += scales[s_b] * x[b, t] @ lora_a[s_b]^T @ lora_bt[s_b]``, in place.

    ``x`` ``[rows * tokens, K]`` (any leading shape), ``out`` likewise with ``N`` features,
    ``lora_a`` ``[S + 1, R, K]``, ``lora_bt`` ``[S + 1, R, N]`` (one layer's slots, each slot's
    ``[R, *]`` block contiguous in its last axis), ``scales`` ``[S + 1]`` (any stride),
    ``index`` ``[rows]`` integer slots. Rows whose slot has scale 0 are left as they are.
    """
    if not kernel_available(x.device):
        add_lora_reference(x, out, lora_a, lora_bt, scales, index, rows)
        return
    k_features = lora_a.shape[-1]
    n_features = lora_bt.shape[-1]
    x2 = x.reshape(-1, k_features)
    out2 = out.view(-1, n_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tokens = x2.shape[0] // rows
    rank = lora_a.shape[-2]
    block_m = _block_m(tokens)
    block_n = _block_n(n_features, k_features)
    m_blocks = -(-tokens // block_m)
    grid = (rows * m_blocks, -(-n_features // block_n))
    _kernel(interpreting())[grid](
        x2,
        out2,
        lora_a,
        lora_bt,
        scales,
        index,
        tokens,
        k_features,
        n_features,
        m_blocks,
        x2.stride(0),
        out2.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_bt.stride(0),
        lora_bt.stride(1),
        scales.stride(0),
        RANK=rank,
        RANK_PAD=max(16, _next_pow2(rank)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=64 if k_features < 128 else 128,
        # fp32 products in IEEE precision (not TF32): fp32 models, and the interpreter, whose
        # bf16 dot is wrong (Triton 3.9 on numpy).
        IEEE=x2.dtype == torch.float32 or interpreting(),
    )


def add_lora_reference(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    scales: torch.Tensor,
    index: torch.Tensor,
    rows: int,
) -> None:
    """``add_lora`` with stock torch ops (gather each row's slot, two ``bmm``)."""
    k_features = lora_a.shape[-1]
    index = index.long()
    x3 = x.reshape(rows, -1, k_features)
    a = lora_a.index_select(0, index)  # [rows, R, K]
    bt = lora_bt.index_select(0, index)  # [rows, R, N]
    h = torch.bmm(x3, a.transpose(1, 2))
    h.mul_(scales.index_select(0, index).to(h.dtype).view(rows, 1, 1))
    out.view(rows, x3.shape[1], -1).baddbmm_(h, bt)
