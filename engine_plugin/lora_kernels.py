"""LoRA deltas in one or two Triton launches per group of modules that share an input.

``out_g[t] += scale_g[s] * (x[t] @ A_g[s]^T) @ B_g[s]^T`` for every output ``g`` of a group
(``q/k/v`` read one input, so do ``gate/up``), ``s`` the slot of token ``t``'s row.

Why: the eager paths of ``layers`` add a module's delta with four or five stock ops, each a
kernel launch, and on a GPU a decode step of a small model is bound by launches: the 0.5B
shape's base launches ~1,000 kernels a step and four more per wrapped module (168 modules) made
the engine 1.7x slower than its base. Under a CUDA graph the launch cost goes, and what is left
is each kernel's own latency, so both the count and the length of the kernels matter:

* **fused** (inputs up to ``KernelConfig.fused_max_k`` features): one launch for the group. A
  program takes ``BLOCK_M`` tokens of one row (one slot, so ``tl.dot`` on the tensor cores) and
  ``BLOCK_N`` features of one output; it computes the tokens' shrink ``x @ A^T`` (``K * R`` a
  token, recomputed per output tile) and adds ``h @ B^T`` (Punica's SGMV shrink and expand,
  fused).
* **split** (wider inputs, e.g. ``down_proj``): the shrink's ``K`` loop would be the kernel's
  whole latency, so it is split over chunks of ``KernelConfig.split_chunk`` features in parallel
  (partial sums in a small fp32 buffer), and a second launch sums them and adds ``h @ B^T``.

Which of the two, and the tile sizes, are a ``KernelConfig``: the defaults were chosen on CPU
reasoning and one H200 run; ``bench/bench_lora_kernels.py --device cuda`` times the
alternatives per module group under a CUDA graph and prints the best as a
``LORACAT_LORA_KERNELS`` value, which this module reads when it is imported.

Routing is read from device tensors only (``index``: each row's slot; each output's column of
the pool's ``scales``: each slot's scale, 0 for the zero slot and for empty slots), never from
the host. That is what lets a CUDA graph capture the launches once and stay valid while
adapters are attached, detached and swapped: the engine rewrites those tensors in place (see
``graphs``). An output whose slot has scale 0 is skipped, so base rows cost only their
programs' start.

``add_lora_group`` runs the kernels on CUDA (or under Triton's CPU interpreter, for tests) and
``add_lora_reference`` per output otherwise: the same sum with stock torch ops, the CPU path
and the reference the kernels are tested against.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Off switch (``LORACAT_TRITON=0``): every device takes the torch path.
_DISABLED = os.environ.get("LORACAT_TRITON", "1") == "0"
#: Run the kernels on CPU tensors through Triton's interpreter (tests). Triton must have been
#: imported with ``TRITON_INTERPRET=1`` already: its own library functions are compiled or
#: interpreted from the moment it is imported (``tests/engine/conftest.py`` sets it on CPU
#: machines before this module is imported).
INTERPRET_ON_CPU = False
#: Outputs one launch serves (q/k/v).
MAX_GROUP = 3
_WARPS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class KernelConfig:
    """How ``add_lora_group`` launches its kernels on a device.

    ``fused_max_k``: inputs up to this many features take the fused kernel, wider ones the
    split one (0: always split). ``split_from_tokens``: rows of at least this many tokens
    (prefill) take the split kernels whatever the width, so the shrink is not recomputed for
    every output tile (0: never). ``fused_block_k``: features of the input a fused program
    reads per step of its shrink loop. ``split_chunk``: features each program of the split
    shrink reads, in steps of ``split_block_k``. ``num_warps``: per program, every launch.
    ``overlap`` (0 or 1): under CUDA graph capture, run the split shrink on a side stream
    while the base computes (``add_lora_group_over``); off by default until a GPU has
    measured it. Block sizes are powers of two of at least 16 (``tl.dot``'s least inner size).
    """

    fused_max_k: int = 1024
    split_from_tokens: int = 0
    fused_block_k: int = 256
    split_chunk: int = 512
    split_block_k: int = 128
    num_warps: int = 4
    overlap: int = 0

    def __post_init__(self) -> None:
        for name in ("fused_block_k", "split_block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, not {value}")
        for name in ("fused_max_k", "split_from_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.split_chunk < self.split_block_k:
            raise ValueError(
                f"split_chunk ({self.split_chunk}) must be >= split_block_k ({self.split_block_k})"
            )
        if self.overlap not in (0, 1):
            raise ValueError(f"overlap must be 0 or 1, not {self.overlap}")
        if self.num_warps not in _WARPS:
            raise ValueError(f"num_warps must be one of {_WARPS}, not {self.num_warps}")

    @classmethod
    def parse(cls, text: str) -> KernelConfig:
        """``"fused_max_k=1024,split_chunk=256"``: the named fields, the rest at their defaults.

        Raises:
            ValueError: naming the item that is not ``field=integer`` of a known field, or the
                value out of range.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in fields:
                raise ValueError(f"{item!r} is not field=value with a field of {sorted(fields)}")
            try:
                values[name] = int(value)
            except ValueError:
                raise ValueError(f"{item!r}: the value is not an integer") from None
        return cls(**values)

    def text(self) -> str:
        """The form ``parse`` reads (every field)."""
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def _config_from_env() -> KernelConfig:
    text = os.environ.get("LORACAT_LORA_KERNELS", "")
    try:
        return KernelConfig.parse(text)
    except ValueError as exc:
        raise ValueError(f"LORACAT_LORA_KERNELS={text!r}: {exc}") from None


#: What ``add_lora_group`` uses unless a call passes its own (``LORACAT_LORA_KERNELS``, read
#: once, when this module is imported; an unreadable value is refused right there).
CONFIG = _config_from_env()

try:
    if _DISABLED:
        raise ImportError("disabled by LORACAT_TRITON=0")
    import triton as _triton
    import triton.language as _triton_language
except ImportError:
    _triton = _triton_language = None
triton: Any = _triton
tl: Any = _triton_language


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``
    when it was imported; the kernels below are decorated accordingly)."""
    return bool(triton is not None and triton.knobs.runtime.interpret)


def kernel_available(device: torch.device) -> bool:
    """Whether ``add_lora_group`` runs the Triton kernels for tensors on ``device``."""
    if triton is None:
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and INTERPRET_ON_CPU and interpreting()


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _shrink(  # type: ignore[no-untyped-def]
        x_ptr,
        a_ptr,
        tok,
        mask_m,
        k_start,
        k_stop,
        stride_xt,
        stride_ar,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """``x[tok, k_start:k_stop] @ A[:, k_start:k_stop]^T`` as ``[BLOCK_M, RANK_PAD]`` fp32
        (``a_ptr`` at the slot's ``[R, K]`` block)."""
        offs_r = tl.arange(0, RANK_PAD)
        mask_r = offs_r < RANK
        h = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_stop
            x = tl.load(
                x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            a_t = tl.load(
                a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None],
                mask=mask_r[None, :] & mask_k[:, None],
                other=0.0,
            )
            if IEEE:
                h += tl.dot(x.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
            else:
                h += tl.dot(x, a_t)
        return h

    @triton.jit  # type: ignore[untyped-decorator]
    def _expand(  # type: ignore[no-untyped-def]
        h,
        bt_ptr,
        out_ptr,
        tok,
        mask_m,
        n_block,
        n_features,
        stride_br,
        stride_ot,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """``out[tok, block] += h @ B^T[:, block]`` (``bt_ptr`` at the slot's ``[R, N]``)."""
        offs_r = tl.arange(0, RANK_PAD)
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_features
        bt = tl.load(
            bt_ptr + offs_r[:, None] * stride_br + offs_n[None, :],
            mask=(offs_r < RANK)[:, None] & mask_n[None, :],
            other=0.0,
        )
        if IEEE:
            delta = tl.dot(h.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            delta = tl.dot(h.to(bt.dtype), bt)
        out_ptrs = out_ptr + tok[:, None] * stride_ot + offs_n[None, :]
        mask_out = mask_m[:, None] & mask_n[None, :]
        current = tl.load(out_ptrs, mask=mask_out, other=0.0)
        tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=mask_out)

    @triton.jit  # type: ignore[untyped-decorator]
    def _output_of(pid_n, nb0, nb1, NUM: tl.constexpr):  # type: ignore[no-untyped-def]
        """Which output (0, 1, 2) an output-tile program serves, and its tile there."""
        which = pid_n * 0
        n_block = pid_n
        if NUM > 1:  # noqa: SIM102 (Triton: constexpr and runtime tests apart)
            if pid_n >= nb0:
                which = pid_n * 0 + 1
                n_block = pid_n - nb0
        if NUM > 2:  # noqa: SIM102
            if pid_n >= nb0 + nb1:
                which = pid_n * 0 + 2
                n_block = pid_n - nb0 - nb1
        return which, n_block

    @triton.jit  # type: ignore[untyped-decorator]
    def _pick(which, v0, v1, v2, NUM: tl.constexpr):  # type: ignore[no-untyped-def]
        """``v0``, ``v1`` or ``v2`` for output ``which`` (a scalar branch: no vector select)."""
        value = v0
        if NUM > 1 and which == 1:
            value = v1
        if NUM > 2 and which == 2:
            value = v2
        return value

    @triton.jit  # type: ignore[untyped-decorator]
    def _fused_group_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        index_ptr,
        a0,
        a1,
        a2,
        b0,
        b1,
        b2,
        o0,
        o1,
        o2,
        s0,
        s1,
        s2,
        n0,
        n1,
        n2,
        nb0,
        nb1,
        sb0,
        sb1,
        sb2,
        so0,
        so1,
        so2,
        br0,
        br1,
        br2,
        tokens,
        k_features,
        m_blocks,
        stride_xt,
        stride_as,
        stride_ar,
        stride_scale,
        NUM: tl.constexpr,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        row = pid_m // m_blocks
        slot = tl.load(index_ptr + row)
        which, n_block = _output_of(tl.program_id(1), nb0, nb1, NUM)
        a_ptr = _pick(which, a0, a1, a2, NUM)
        scale = tl.load(_pick(which, s0, s1, s2, NUM) + slot * stride_scale)
        if scale != 0.0:
            offs_m = (pid_m % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < tokens
            tok = row * tokens + offs_m
            h = _shrink(
                x_ptr,
                a_ptr + slot * stride_as,
                tok,
                mask_m,
                0,
                k_features,
                stride_xt,
                stride_ar,
                RANK,
                RANK_PAD,
                BLOCK_M,
                BLOCK_K,
                IEEE,
            )
            _expand(
                h * scale,
                _pick(which, b0, b1, b2, NUM) + slot * _pick(which, sb0, sb1, sb2, NUM),
                _pick(which, o0, o1, o2, NUM),
                tok,
                mask_m,
                n_block,
                _pick(which, n0, n1, n2, NUM),
                _pick(which, br0, br1, br2, NUM),
                _pick(which, so0, so1, so2, NUM),
                RANK,
                RANK_PAD,
                BLOCK_N,
                IEEE,
            )

    @triton.jit  # type: ignore[untyped-decorator]
    def _split_shrink_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        index_ptr,
        partial_ptr,
        a0,
        a1,
        a2,
        s0,
        s1,
        s2,
        tokens,
        total_tokens,
        k_features,
        m_blocks,
        stride_xt,
        stride_as,
        stride_ar,
        stride_scale,
        NUM: tl.constexpr,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        CHUNK: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Partial shrinks: program ``(m, chunk, g)`` writes ``partial[g, chunk, tok, :]``."""
        pid_m = tl.program_id(0)
        chunk = tl.program_id(1)
        which = tl.program_id(2)
        row = pid_m // m_blocks
        slot = tl.load(index_ptr + row)
        a_ptr = _pick(which, a0, a1, a2, NUM)
        scale = tl.load(_pick(which, s0, s1, s2, NUM) + slot * stride_scale)
        if scale != 0.0:
            offs_m = (pid_m % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < tokens
            tok = row * tokens + offs_m
            k_start = chunk * CHUNK
            h = _shrink(
                x_ptr,
                a_ptr + slot * stride_as,
                tok,
                mask_m,
                k_start,
                tl.minimum(k_start + CHUNK, k_features),
                stride_xt,
                stride_ar,
                RANK,
                RANK_PAD,
                BLOCK_M,
                BLOCK_K,
                IEEE,
            )
            offs_r = tl.arange(0, RANK_PAD)
            dst = (
                partial_ptr
                + ((which * tl.num_programs(1) + chunk) * total_tokens + tok[:, None]) * RANK_PAD
                + offs_r[None, :]
            )
            tl.store(dst, h, mask=mask_m[:, None])

    @triton.jit  # type: ignore[untyped-decorator]
    def _split_expand_kernel(  # type: ignore[no-untyped-def]
        partial_ptr,
        index_ptr,
        b0,
        b1,
        b2,
        o0,
        o1,
        o2,
        s0,
        s1,
        s2,
        n0,
        n1,
        n2,
        nb0,
        nb1,
        sb0,
        sb1,
        sb2,
        so0,
        so1,
        so2,
        br0,
        br1,
        br2,
        tokens,
        total_tokens,
        chunks,
        m_blocks,
        stride_scale,
        NUM: tl.constexpr,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        row = pid_m // m_blocks
        slot = tl.load(index_ptr + row)
        which, n_block = _output_of(tl.program_id(1), nb0, nb1, NUM)
        scale = tl.load(_pick(which, s0, s1, s2, NUM) + slot * stride_scale)
        if scale != 0.0:
            offs_m = (pid_m % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < tokens
            tok = row * tokens + offs_m
            offs_r = tl.arange(0, RANK_PAD)
            h = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
            for chunk in range(0, chunks):
                src = (
                    partial_ptr
                    + ((which * chunks + chunk) * total_tokens + tok[:, None]) * RANK_PAD
                    + offs_r[None, :]
                )
                h += tl.load(src, mask=mask_m[:, None], other=0.0)
            _expand(
                h * scale,
                _pick(which, b0, b1, b2, NUM) + slot * _pick(which, sb0, sb1, sb2, NUM),
                _pick(which, o0, o1, o2, NUM),
                tok,
                mask_m,
                n_block,
                _pick(which, n0, n1, n2, NUM),
                _pick(which, br0, br1, br2, NUM),
                _pick(which, so0, so1, so2, NUM),
                RANK,
                RANK_PAD,
                BLOCK_N,
                IEEE,
            )


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_m(tokens: int) -> int:
    # tl.dot needs 16 rows at least; long rows (prefill) take 64 tokens a program.
    return 16 if tokens <= 16 else (32 if tokens <= 32 else 64)


def _block_n(n_features: int) -> int:
    return 256 if n_features >= 2048 else 128


def _padded(items: Sequence[Any], fill: Any) -> list[Any]:
    return [*items, *([fill] * (MAX_GROUP - len(items)))]


def add_lora_group(
    x: torch.Tensor,
    outs: Sequence[torch.Tensor],
    lora_as: Sequence[torch.Tensor],
    lora_bts: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    index: torch.Tensor,
    rows: int,
    config: KernelConfig | None = None,
) -> None:
    """For each output ``g``: ``outs[g][b, t] += scales[g][s_b] * x[b, t] @ lora_as[g][s_b]^T
    @ lora_bts[g][s_b]``, in place.

    ``x`` ``[rows * tokens, K]`` (any leading shape), ``outs[g]`` likewise with ``N_g``
    features (a contiguous last axis); ``lora_as[g]`` ``[S + 1, R, K]`` and ``lora_bts[g]``
    ``[S + 1, R, N_g]`` (one layer's slots; every ``lora_as[g]`` with the same strides);
    ``scales[g]`` ``[S + 1]`` (any stride, the same for all); ``index`` ``[rows]`` integer
    slots. Up to ``MAX_GROUP`` outputs.
    Rows whose slot has scale 0 in an output are left as they are there. ``config``: how the
    kernels launch (``CONFIG`` when None); the torch path ignores it.
    """
    if not kernel_available(x.device):
        for out, lora_a, lora_bt, scale in zip(outs, lora_as, lora_bts, scales, strict=True):
            add_lora_reference(x, out, lora_a, lora_bt, scale, index, rows)
        return
    launch = _GroupLaunch(x, lora_as, lora_bts, scales, index, rows, config or CONFIG)
    if launch.fused:
        launch.fused_kernel(outs)
        return
    launch.split_shrink()
    launch.split_expand(outs)


def add_lora_group_over(
    base_outputs: Callable[[], list[torch.Tensor]],
    x: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    lora_bts: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    index: torch.Tensor,
    rows: int,
    config: KernelConfig | None = None,
) -> list[torch.Tensor]:
    """The group's base outputs, ``base_outputs()`` (computed from ``x``), with the deltas of
    ``add_lora_group`` added.

    With ``config.overlap``, on a GPU while a CUDA graph is being captured and for an input
    that takes the split kernels, the shrink runs on a side stream while the base computes its
    outputs (both only read ``x``), and only the expand waits for them: in a captured decode
    step the shrink's latency leaves the critical path. Otherwise: the base, then
    ``add_lora_group``.
    """
    cfg = config or CONFIG
    if not (cfg.overlap and kernel_available(x.device) and _overlapping(x.device)):
        outs = base_outputs()
        add_lora_group(x, outs, lora_as, lora_bts, scales, index, rows, cfg)
        return outs
    launch = _GroupLaunch(x, lora_as, lora_bts, scales, index, rows, cfg)
    if launch.fused:
        outs = base_outputs()
        launch.fused_kernel(outs)
        return outs
    if x.device.type != "cuda":  # the interpreter (tests): the same order, one stream
        launch.split_shrink()
        outs = base_outputs()
        launch.split_expand(outs)
        return outs
    current = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    side.wait_stream(current)  # x (and the partial sums' buffer) are ready
    with torch.cuda.stream(side):
        launch.split_shrink()
    outs = base_outputs()
    current.wait_stream(side)
    # Everything the side stream touched (x, the buffer) is alive until this returns, and any
    # later use of their memory is queued on the current stream after this join.
    launch.split_expand(outs)
    return outs


#: Run the overlapped order on CPU under the interpreter (tests; no streams there).
OVERLAP_ON_CPU = False
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _overlapping(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_current_stream_capturing())
    return OVERLAP_ON_CPU


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    return stream


class _GroupLaunch:
    """One group's kernel arguments, worked out once: the fused launch, or the split shrink
    (it needs only the input) and the split expand (it needs the outputs)."""

    def __init__(
        self,
        x: torch.Tensor,
        lora_as: Sequence[torch.Tensor],
        lora_bts: Sequence[torch.Tensor],
        scales: Sequence[torch.Tensor],
        index: torch.Tensor,
        rows: int,
        config: KernelConfig,
    ) -> None:
        self.num = len(lora_as)
        self.config = config
        k_features = lora_as[0].shape[-1]
        x2 = x.reshape(-1, k_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        self.x2, self.index, self.rows, self.k_features = x2, index, rows, k_features
        self.total = x2.shape[0]
        self.tokens = self.total // rows
        self.rank = lora_as[0].shape[-2]
        self.rank_pad = max(16, _next_pow2(self.rank))
        self.block_m = _block_m(self.tokens)
        self.m_blocks = -(-self.tokens // self.block_m)
        self.n_feats = [b.shape[-1] for b in lora_bts]
        self.block_n = _block_n(max(self.n_feats))
        self.n_blocks = [-(-n // self.block_n) for n in self.n_feats]
        self.ieee = x2.dtype == torch.float32 or interpreting()
        self.a = _padded(lora_as, lora_as[0])
        self.b = _padded(lora_bts, lora_bts[0])
        self.s = _padded(scales, scales[0])
        self.n = _padded(self.n_feats, 0)
        self.nb = _padded(self.n_blocks, 0)
        self.sb = _padded([t.stride(0) for t in lora_bts], 0)
        self.br = _padded([t.stride(1) for t in lora_bts], 0)
        self.out_tiles = (rows * self.m_blocks, sum(self.n_blocks))
        self.fused = k_features <= config.fused_max_k and not (
            config.split_from_tokens and self.tokens >= config.split_from_tokens
        )
        self.chunks = -(-k_features // config.split_chunk)
        self.partial: torch.Tensor | None = None
        if not self.fused:
            # Made here, on the caller's stream, even when the shrink runs on a side stream.
            self.partial = torch.empty(
                (self.num, self.chunks, self.total, self.rank_pad),
                dtype=torch.float32,
                device=x.device,
            )

    def _outputs(self, outs: Sequence[torch.Tensor]) -> tuple[list[Any], list[Any]]:
        outs2 = [o.view(-1, o.shape[-1]) for o in outs]
        return _padded(outs2, outs2[0]), _padded([t.stride(0) for t in outs2], 0)

    def fused_kernel(self, outs: Sequence[torch.Tensor]) -> None:
        o, so = self._outputs(outs)
        cfg, nb = self.config, self.nb
        _fused_group_kernel[self.out_tiles](
            self.x2, self.index, *self.a, *self.b, *o, *self.s, *self.n, nb[0], nb[1],
            *self.sb, *so, *self.br,
            self.tokens, self.k_features, self.m_blocks, self.x2.stride(0),
            self.a[0].stride(0), self.a[0].stride(1), self.s[0].stride(0),
            NUM=self.num, RANK=self.rank, RANK_PAD=self.rank_pad, BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            BLOCK_K=min(cfg.fused_block_k, max(64, _next_pow2(self.k_features))), IEEE=self.ieee,
            num_warps=cfg.num_warps,
        )  # fmt: skip

    def split_shrink(self) -> None:
        cfg = self.config
        _split_shrink_kernel[(self.rows * self.m_blocks, self.chunks, self.num)](
            self.x2, self.index, self.partial, *self.a, *self.s,
            self.tokens, self.total, self.k_features, self.m_blocks, self.x2.stride(0),
            self.a[0].stride(0), self.a[0].stride(1), self.s[0].stride(0),
            NUM=self.num, RANK=self.rank, RANK_PAD=self.rank_pad, BLOCK_M=self.block_m,
            BLOCK_K=cfg.split_block_k, CHUNK=cfg.split_chunk, IEEE=self.ieee,
            num_warps=cfg.num_warps,
        )  # fmt: skip

    def split_expand(self, outs: Sequence[torch.Tensor]) -> None:
        o, so = self._outputs(outs)
        nb = self.nb
        _split_expand_kernel[self.out_tiles](
            self.partial, self.index, *self.b, *o, *self.s, *self.n, nb[0], nb[1],
            *self.sb, *so, *self.br,
            self.tokens, self.total, self.chunks, self.m_blocks, self.s[0].stride(0),
            NUM=self.num, RANK=self.rank, RANK_PAD=self.rank_pad, BLOCK_M=self.block_m,
            BLOCK_N=self.block_n, IEEE=self.ieee, num_warps=self.config.num_warps,
        )  # fmt: skip


def add_lora(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    scales: torch.Tensor,
    index: torch.Tensor,
    rows: int,
    config: KernelConfig | None = None,
) -> None:
    """``add_lora_group`` for one output."""
    add_lora_group(x, [out], [lora_a], [lora_bt], [scales], index, rows, config)


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
