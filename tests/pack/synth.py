"""Packs and raw safetensors files built by hand, without torch: for hostile-input tests."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

from catalog.pack import ModuleSpec, PackManifest, TensorBytes, write_pack
from catalog.pack.format import lora_a_name, lora_b_name


def raw_safetensors(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    """A file with exactly this header (dict, or raw JSON bytes) and data section."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def small_manifest(**overrides: Any) -> PackManifest:
    fields: dict[str, Any] = dict(
        base_id="tiny-llama",
        rank=4,
        alpha=8.0,
        dtype="F32",
        use_rslora=False,
        num_layers=3,
        num_experts=0,
        modules=(
            ModuleSpec(
                "self_attn.q_proj",
                in_features=6,
                out_features=6,
                rank=4,
                alpha=8.0,
                layers=(0, 1, 2),
            ),
            ModuleSpec(
                "mlp.down_proj", in_features=10, out_features=6, rank=2, alpha=4.0, layers=(1,)
            ),
        ),
        source={"kind": "test"},
    )
    fields.update(overrides)
    return PackManifest(**fields)


def random_tensors(manifest: PackManifest, seed: int = 0) -> dict[str, TensorBytes]:
    rng = random.Random(seed)
    tensors = {}
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}[manifest.dtype]
    for m in manifest.modules:
        for name, shape in (
            (lora_a_name(m.name), m.shape_a),
            (lora_b_name(m.name), manifest.stored_shape_b(m)),
        ):
            count = 1
            for d in shape:
                count *= d
            tensors[name] = TensorBytes(
                manifest.dtype, shape, memoryview(rng.randbytes(count * itemsize))
            )
    return tensors


def small_pack(**overrides: Any) -> bytes:
    manifest = small_manifest(**overrides)
    return write_pack(manifest, random_tensors(manifest))


def split_pack(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header as a dict, data section) of a pack, for editing and re-assembling."""
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def edit_manifest(data: bytes, **changes: Any) -> bytes:
    """The pack with its manifest JSON fields replaced (no re-validation)."""
    header, body = split_pack(data)
    manifest = json.loads(header["__metadata__"]["loracat.manifest"])
    manifest.update(changes)
    header["__metadata__"]["loracat.manifest"] = json.dumps(manifest)
    return raw_safetensors(header, body)
