"""Random but well-formed packs, for demos, benchmarks and load tests (no torch, no PEFT).

Values are small Gaussian noise so attached adapters change outputs visibly without blowing up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from catalog.pack.container import TensorBytes
from catalog.pack.format import lora_a_name, lora_b_name, write_pack
from catalog.pack.manifest import ModuleSpec, PackManifest

_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16}


def _random_bytes(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float
) -> bytes:
    values = rng.standard_normal(shape, dtype=np.float32) * scale
    if dtype == "BF16":
        # bf16 is the top half of an fp32: round-to-nearest-even on the dropped 16 bits.
        bits = values.view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype(np.uint16).tobytes()
    return values.astype(_NUMPY_DTYPES[dtype]).tobytes()


def random_pack(
    modules: Sequence[tuple[str, int, int]],
    *,
    num_layers: int,
    rank: int,
    base_id: str,
    alpha: float | None = None,
    dtype: str = "F32",
    seed: int = 0,
    scale: float = 0.02,
) -> bytes:
    """A pack adapting ``modules`` (``(name, in_features, out_features)``) in every layer."""
    rng = np.random.default_rng(seed)
    alpha = float(2 * rank if alpha is None else alpha)
    specs = tuple(
        ModuleSpec(name, fin, fout, rank, alpha, tuple(range(num_layers)))
        for name, fin, fout in modules
    )
    manifest = PackManifest(
        base_id=base_id,
        rank=rank,
        alpha=alpha,
        dtype=dtype,
        use_rslora=False,
        num_layers=num_layers,
        num_experts=0,
        modules=specs,
        source={"kind": "synthetic", "seed": seed},
    )
    tensors: dict[str, TensorBytes] = {}
    for spec in specs:
        for name, shape in (
            (lora_a_name(spec.name), spec.shape_a),
            (lora_b_name(spec.name), manifest.stored_shape_b(spec)),
        ):
            data = _random_bytes(rng, tuple(shape), dtype, scale)
            tensors[name] = TensorBytes(dtype, tuple(shape), memoryview(data))
    return write_pack(manifest, tensors)
