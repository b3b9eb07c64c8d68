"""Pack format 2: ``lora_B`` stored rank-major; format-1 packs still read; kept header parses."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from catalog.errors import InvalidPack
from catalog.pack import (
    PACK_FORMAT_VERSION,
    ParsedHeaders,
    TensorBytes,
    convert_pack,
    export_peft_dir,
    read_pack,
)
from catalog.pack.format import swap_last_axes
from tests.pack.synth import small_pack, split_pack


def _array(t: TensorBytes) -> np.ndarray:
    return np.frombuffer(t.data, dtype=np.uint32).reshape(t.shape)


def test_new_packs_store_lora_b_rank_major_and_format_1_reads_alike() -> None:
    new = small_pack()
    old = convert_pack(new, 1)
    assert PACK_FORMAT_VERSION == 2
    assert read_pack(new).manifest.lora_b_rank_major
    assert not read_pack(old).manifest.lora_b_rank_major
    for pack_bytes in (new, old):
        pack = read_pack(pack_bytes)
        for module in pack.manifest.modules:
            _, b, rank_major = pack.stored_tensors(module.name)
            assert b.shape == (module.shape_bt if rank_major else module.shape_b)
            # Whatever is stored, module_tensors gives PEFT's orientation, the same in both.
            peft_a, peft_b = pack.module_tensors(module.name)
            assert peft_b.shape == module.shape_b
            other = read_pack(old if pack_bytes is new else new)
            other_a, other_b = other.module_tensors(module.name)
            assert peft_a.tobytes() == other_a.tobytes()
            assert peft_b.tobytes() == other_b.tobytes()
            stored = _array(b)
            expected = _array(peft_b).swapaxes(-1, -2) if rank_major else _array(peft_b)
            assert np.array_equal(stored, expected)
    # Converting back and forth is lossless, byte for byte.
    assert convert_pack(old, 2) == new
    assert convert_pack(new, 2) == new


def test_swapping_axes_moves_bits_not_values() -> None:
    # NaN payloads and negative zero survive: elements move as integers.
    raw = np.array([0x7FC00001, 0x80000000, 0x3F800000, 0xFF800000, 1, 2], dtype=np.uint32)
    tensor = TensorBytes("F32", (1, 2, 3), memoryview(raw.tobytes()))
    swapped = swap_last_axes(tensor)
    assert swapped.shape == (1, 3, 2)
    assert np.array_equal(_array(swapped), raw.reshape(1, 2, 3).swapaxes(1, 2))
    assert swap_last_axes(swapped).tobytes() == tensor.tobytes()


def test_a_format_1_header_over_rank_major_bytes_is_refused() -> None:
    """The manifest's version decides the expected lora_B shape: a pack claiming format 1 with
    rank-major shapes (or the reverse) is refused by name, never read transposed."""
    header, body = split_pack(small_pack())
    manifest = json.loads(header["__metadata__"]["loracat.manifest"])
    manifest["format_version"] = 1
    header["__metadata__"]["loracat.manifest"] = json.dumps(manifest)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    edited = struct.pack("<Q", len(text)) + text + body
    with pytest.raises(InvalidPack, match=r"lora_B' has shape \[1, 2, 6\] but the manifest"):
        read_pack(edited)


def test_export_is_the_same_peft_directory_from_either_format(tmp_path: Path) -> None:
    new = small_pack()
    export_peft_dir(new, tmp_path / "new")
    export_peft_dir(convert_pack(new, 1), tmp_path / "old")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()


def test_parsed_headers_reuse_a_parse_only_for_an_identical_header() -> None:
    headers = ParsedHeaders(capacity=2)
    first, second = small_pack(), convert_pack(small_pack(), 1)
    pack = headers.read(first)
    again = headers.read(bytearray(first))
    assert again.manifest is pack.manifest  # the kept parse
    assert again.tensor_names() == pack.tensor_names()
    for name in pack.tensor_names():
        assert again.tensor(name).tobytes() == pack.tensor(name).tobytes()
    # Another pack with the same header (a new revision of the same layout) shares the parse,
    # with views of its own bytes.
    base = pack.data_offset
    other_bytes = first[:base] + bytes(b ^ 0x5A for b in first[base:])
    other = headers.read(other_bytes)
    assert other.manifest is pack.manifest
    for name in pack.tensor_names():
        assert other.tensor(name).tobytes() == read_pack(other_bytes).tensor(name).tobytes()
        assert other.tensor(name).tobytes() != pack.tensor(name).tobytes()
    # Other headers: parsed afresh, never served the kept views.
    assert not headers.read(second).manifest.lora_b_rank_major
    # A corrupt header, or the kept header over bytes of another length, is still refused.
    bad = bytearray(first)
    bad[10] ^= 0xFF
    with pytest.raises(InvalidPack):
        headers.read(bytes(bad))
    with pytest.raises(InvalidPack, match="trailing bytes"):
        headers.read(first + b"\0" * 8)
    with pytest.raises(InvalidPack):
        headers.read(first[:-2])
    with pytest.raises(InvalidPack):
        headers.read(first[:4])
    # Bounded: the least recently used parse goes.
    for data in (first, second, small_pack(base_id="another")):
        headers.read(data)
    assert len(headers._parsed) == 2
