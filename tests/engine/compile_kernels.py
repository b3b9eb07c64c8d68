"""Compile the LoRA kernels for a Hopper GPU (sm_90) without one: Triton's compiler runs on
the host (ptxas ships with it). Run in a process of its own, as the tests import Triton in
interpreter mode. Prints one line per compiled variant; exits non-zero on a compile error."""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine_plugin import lora_kernels as kernels
from engine_plugin import slot_copy

POINTERS = {"x_ptr", "a0", "a1", "a2", "b0", "b1", "b2", "o0", "o1", "o2"}
FP32_POINTERS = {"partial_ptr", "s0", "s1", "s2"}


def arg_type(name: str, dtype: str) -> str:
    if name in ("index_ptr", "table_ptr"):
        return "*i64"
    if name == "src_ptr":
        return "*i16"
    if name in FP32_POINTERS:
        return "*fp32"
    if name in POINTERS:
        return f"*{dtype}"
    return "i32"


def compile_variant(fn: object, dtype: str, constexprs: dict[str, object]) -> None:
    names = fn.arg_names  # type: ignore[attr-defined]
    signature = {n: "constexpr" if n in constexprs else arg_type(n, dtype) for n in names}
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    print(fn.__name__, dtype, constexprs.get("NUM"), "ok", compiled.metadata.shared)  # type: ignore[attr-defined]


def main() -> int:
    for num in (1, 2, 3):
        for dtype, ieee in (("bf16", False), ("fp16", False), ("fp32", True)):
            common = {"NUM": num, "RANK": 16, "RANK_PAD": 16, "IEEE": ieee}
            compile_variant(
                kernels._fused_group_kernel,
                dtype,
                {**common, "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 256},
            )
            compile_variant(
                kernels._split_shrink_kernel,
                dtype,
                {**common, "RANK": 8, "BLOCK_M": 64, "BLOCK_K": 128, "CHUNK": 512},
            )
            compile_variant(
                kernels._split_expand_kernel, dtype, {**common, "BLOCK_M": 16, "BLOCK_N": 256}
            )
    compile_variant(slot_copy._scatter_kernel, "i16", {"BLOCK": 4096})
    compile_variant(slot_copy._zero_kernel, "i16", {"BLOCK": 4096})
    return 0


if __name__ == "__main__":
    sys.exit(main())
