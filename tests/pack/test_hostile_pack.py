"""Malformed and hostile pack bytes are refused with InvalidPack naming the problem."""

from __future__ import annotations

import json
import re
import struct

import pytest

from catalog.errors import InvalidPack
from catalog.pack import (
    MAX_PACK_HEADER_BYTES,
    PACK_FORMAT,
    TensorBytes,
    pack_header_nbytes,
    read_pack,
    read_pack_header,
    write_pack,
)
from tests.pack.synth import (
    edit_manifest,
    random_tensors,
    raw_safetensors,
    small_manifest,
    small_pack,
    split_pack,
)


def _refused(data: bytes, message: str) -> None:
    """read_pack refuses ``data`` with exactly ``message`` (a regex, anchored at both ends)."""
    with pytest.raises(InvalidPack) as info:
        read_pack(data)
    assert re.fullmatch(message, str(info.value)), str(info.value)


def _with_tensors(tensors: dict[str, object], data: bytes, **metadata: str) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    header.update(tensors)
    return raw_safetensors(header, data)


def test_valid_pack_reads_back() -> None:
    manifest = small_manifest()
    tensors = random_tensors(manifest)
    pack = read_pack(write_pack(manifest, tensors))
    assert pack.manifest == manifest
    assert sorted(pack.tensor_names()) == sorted(tensors)
    for name, tensor in tensors.items():
        assert pack.tensor(name) == tensor
    a, b = pack.module_tensors("mlp.down_proj")
    assert (a.shape, b.shape) == ((1, 2, 10), (1, 6, 2))
    assert pack.tensor("layers.self_attn.q_proj.lora_A").index(2).shape == (4, 6)
    assert pack.buffer.readonly


def test_file_shorter_than_length_field() -> None:
    _refused(b"\x01\x02", r"file is 2 bytes, shorter than the 8-byte header length")


def test_huge_header_length() -> None:
    _refused(
        struct.pack("<Q", 2**63) + b"{}",
        rf"header length {2**63} exceeds the limit of {MAX_PACK_HEADER_BYTES} bytes",
    )


def test_header_longer_than_file() -> None:
    _refused(struct.pack("<Q", 100) + b"{}", r"header length 100 exceeds the file size of 10 bytes")


def test_non_json_header() -> None:
    _refused(raw_safetensors(b"{not json}"), r"header is not valid JSON: .*")


def test_non_utf8_header() -> None:
    _refused(raw_safetensors(b'{"\xff": 1}'), r"header is not valid UTF-8")


def test_header_not_an_object() -> None:
    _refused(raw_safetensors(b"[1, 2, 3]"), r"header is not a JSON object")


def test_deeply_nested_header() -> None:
    _refused(raw_safetensors(b"[" * 100_000 + b"]" * 100_000), r"header is nested too deeply")


def test_duplicate_header_keys() -> None:
    text = b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": 1}'
    _refused(raw_safetensors(text), r"header: duplicate JSON key 'a'")


def test_nan_in_header() -> None:
    _refused(raw_safetensors(b'{"a": NaN}'), r"header: header JSON contains .*NaN")


def test_metadata_not_strings() -> None:
    _refused(
        raw_safetensors({"__metadata__": {"format": 1}}),
        r"__metadata__ is not a map of strings to strings",
    )


def test_unknown_dtype() -> None:
    _refused(
        _with_tensors({"t": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
        r"tensor 't': unknown dtype 'F7'",
    )


def test_negative_or_boolean_shape() -> None:
    for shape in ([-1], [True], [1.0], "4"):
        _refused(
            _with_tensors({"t": {"dtype": "U8", "shape": shape, "data_offsets": [0, 0]}}, b""),
            r"tensor 't': shape .* is not a list of non-negative integers",
        )


def test_extra_entry_fields() -> None:
    spec = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "extra": 1}
    _refused(
        _with_tensors({"t": spec}, b"x"),
        r"tensor 't': entry must have exactly dtype, shape and data_offsets",
    )


def test_size_mismatch() -> None:
    _refused(
        _with_tensors({"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"x" * 20),
        r"tensor 't': data_offsets span 20 bytes but F32 \[2, 3\] needs 24",
    )


def test_reversed_offsets() -> None:
    _refused(
        _with_tensors({"t": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b"x" * 4),
        r"tensor 't': data_offsets \[4, 0\] is not \[begin, end\] with begin <= end",
    )


def test_out_of_range_offsets() -> None:
    _refused(
        _with_tensors(
            {"t": {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}}, b"x" * 8
        ),
        rf"tensor 't': data_offsets \[0, {2**40}\] run past the end of the data section "
        r"\(8 bytes\)",
    )


def test_overlapping_offsets() -> None:
    tensors = {
        "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [16], "data_offsets": [8, 24]},
    }
    _refused(
        _with_tensors(tensors, b"x" * 24),
        r"tensor 'b': data_offsets \[8, 24\] overlap the previous tensor",
    )


def test_hole_between_tensors() -> None:
    tensors = {
        "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [16], "data_offsets": [20, 36]},
    }
    _refused(
        _with_tensors(tensors, b"x" * 36),
        r"tensor 'b': data_offsets \[20, 36\] leave a hole at 16",
    )


def test_hole_at_start() -> None:
    tensors = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}
    _refused(
        _with_tensors(tensors, b"x" * 8), r"tensor 'a': data_offsets \[4, 8\] leave a hole at 0"
    )


def test_truncated_pack() -> None:
    data = small_pack()
    header, body = split_pack(data)
    begin, end = header["layers.self_attn.q_proj.lora_B"]["data_offsets"]
    assert end == len(body), "q_proj.lora_B is the last tensor"
    _refused(
        data[:-1],
        rf"tensor 'layers.self_attn.q_proj.lora_B': data_offsets \[{begin}, {end}\] run past "
        rf"the end of the data section \({len(body) - 1} bytes\)",
    )


def test_truncated_inside_header() -> None:
    data = small_pack()
    _refused(data[:20], r"header length \d+ exceeds the file size of 20 bytes")


def test_trailing_bytes() -> None:
    _refused(small_pack() + b"junk", r"file has 4 trailing bytes after the data section")


def test_plain_safetensors_is_not_a_pack() -> None:
    _refused(
        _with_tensors(
            {"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x", format="pt"
        ),
        rf"not a loracat pack: __metadata__ format is 'pt', expected '{PACK_FORMAT}'",
    )


def test_manifest_missing() -> None:
    header, body = split_pack(small_pack())
    del header["__metadata__"]["loracat.manifest"]
    _refused(
        raw_safetensors(header, body),
        r"pack manifest missing: no 'loracat.manifest' in __metadata__",
    )


def test_manifest_not_json() -> None:
    header, body = split_pack(small_pack())
    header["__metadata__"]["loracat.manifest"] = "{oops"
    _refused(raw_safetensors(header, body), r"pack manifest is not valid JSON: .*")


def test_unknown_metadata_key() -> None:
    header, body = split_pack(small_pack())
    header["__metadata__"]["other"] = "x"
    _refused(raw_safetensors(header, body), r"unknown __metadata__ keys \['other'\]")


def test_manifest_contradicts_shapes() -> None:
    manifest = json.loads(split_pack(small_pack())[0]["__metadata__"]["loracat.manifest"])
    manifest["modules"][0]["in_features"] = 11  # mlp.down_proj really has 10
    _refused(
        edit_manifest(small_pack(), modules=manifest["modules"]),
        r"tensor 'layers.mlp.down_proj.lora_A' has shape \[1, 2, 10\] "
        r"but the manifest implies \[1, 2, 11\]",
    )


def test_manifest_contradicts_dtype() -> None:
    _refused(
        edit_manifest(small_pack(), dtype="BF16"),
        r"tensor 'layers.mlp.down_proj.lora_A' is F32 but the manifest says BF16",
    )


def test_manifest_names_missing_tensor() -> None:
    header, body = split_pack(small_pack())
    # Drop the last tensor (by offset) so the remaining ones still tile the data section.
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    begin = header.pop(last)["data_offsets"][0]
    _refused(
        raw_safetensors(header, body[:begin]),
        rf"manifest names tensor '{re.escape(last)}' but the pack does not have it",
    )


def test_extra_tensor() -> None:
    header, body = split_pack(small_pack())
    header["layers.self_attn.k_proj.lora_A"] = {
        "dtype": "F32",
        "shape": [1],
        "data_offsets": [len(body), len(body) + 4],
    }
    _refused(
        raw_safetensors(header, body + b"\0" * 4),
        r"tensor 'layers.self_attn.k_proj.lora_A' is not named by the manifest",
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 0}, r"rank must be an integer in \[1, 4096\], got 0"),
        ({"rank": True}, r"rank must be an integer in \[1, 4096\], got True"),
        ({"rank": 8}, r"rank 8 is not the largest module rank 4"),
        ({"num_layers": 2}, r"module 'self_attn.q_proj' names layer 2 but the base has 2 layers"),
        ({"num_layers": 10**9}, r"num_layers must be an integer in \[1, 4096\], got 1000000000"),
        ({"format_version": 3}, r"unsupported pack format version 3 \(this reader knows 1, 2\)"),
        (
            {"format_version": True},
            r"unsupported pack format version True \(this reader knows 1, 2\)",
        ),
        ({"base_id": ""}, r"base_id must be a non-empty printable string, got ''"),
        ({"dtype": "I64"}, r"dtype must be one of F32, BF16, F16, got 'I64'"),
        ({"use_rslora": 1}, r"use_rslora must be a boolean, got 1"),
        ({"alpha": "big"}, r"alpha must be a finite number, got 'big'"),
        ({"extra": 1}, r"manifest has unknown fields extra"),
        ({"modules": []}, r"modules must be a non-empty list of at most 1024 entries"),
        ({"modules": [1]}, r"module entry is not a JSON object"),
        ({"source": []}, r"source must be a JSON object"),
        ({"num_experts": 4}, r"num_experts is 4 but no module has experts"),
    ],
)
def test_manifest_field_refused(changes: dict[str, object], message: str) -> None:
    _refused(edit_manifest(small_pack(), **changes), message)


def test_manifest_field_missing() -> None:
    header, body = split_pack(small_pack())
    manifest = json.loads(header["__metadata__"]["loracat.manifest"])
    del manifest["base_id"]
    header["__metadata__"]["loracat.manifest"] = json.dumps(manifest)
    _refused(raw_safetensors(header, body), r"manifest is missing base_id")


@pytest.mark.parametrize(
    ("module_changes", "message"),
    [
        (
            {"rank": 5000},
            r"module 'mlp.down_proj' rank must be an integer in \[1, 4096\], got 5000",
        ),
        (
            {"layers": [1, 1]},
            r"module 'mlp.down_proj' layers must be strictly increasing, got \[1, 1\]",
        ),
        (
            {"layers": []},
            r"module 'mlp.down_proj' layers must be a non-empty list of at most 4096 indices",
        ),
        ({"layers": list(range(5000))}, r"module 'mlp.down_proj' layers must be a non-empty .*"),
        ({"name": "mlp.0.down"}, r"module name 'mlp.0.down' is not a dotted identifier path"),
        ({"name": "self_attn.q_proj"}, r"module 'self_attn.q_proj' is listed twice"),
        ({"in_features": 2**40}, r"module 'mlp.down_proj' in_features must be an integer .*"),
        ({"alpha": None}, r"module 'mlp.down_proj' alpha must be a finite number, got None"),
        ({"bogus": 1}, r"module entry has unknown fields bogus"),
    ],
)
def test_module_field_refused(module_changes: dict[str, object], message: str) -> None:
    manifest = json.loads(split_pack(small_pack())[0]["__metadata__"]["loracat.manifest"])
    manifest["modules"][0].update(module_changes)
    _refused(edit_manifest(small_pack(), modules=manifest["modules"]), message)


def test_write_pack_refuses_inconsistent_tensors() -> None:
    manifest = small_manifest()
    tensors = random_tensors(manifest)
    # PEFT's orientation [L, out, r] where format 2 stores lora_B rank-major, [L, r, out].
    tensors["layers.mlp.down_proj.lora_B"] = TensorBytes("F32", (1, 6, 2), memoryview(bytes(48)))
    with pytest.raises(InvalidPack, match=r"has shape \[1, 6, 2\] but the manifest implies"):
        write_pack(manifest, tensors)
    del tensors["layers.mlp.down_proj.lora_B"]
    with pytest.raises(InvalidPack, match=r"manifest names tensor 'layers.mlp.down_proj.lora_B'"):
        write_pack(manifest, tensors)


def test_tensor_bytes_refuses_wrong_length() -> None:
    with pytest.raises(InvalidPack, match=r"F32 tensor of shape \[2\] needs 8 bytes, got 7"):
        TensorBytes("F32", (2,), memoryview(bytes(7)))


def test_read_pack_header_needs_enough_bytes() -> None:
    data = small_pack()
    needed = pack_header_nbytes(data[:8])
    with pytest.raises(
        InvalidPack, match=rf"header needs {needed} bytes, only {needed - 1} available"
    ):
        read_pack_header(data[: needed - 1])
    with pytest.raises(
        InvalidPack, match=r"file is 3 bytes, shorter than the 8-byte header length"
    ):
        read_pack_header(data[:3])
    manifest, total = read_pack_header(data[:needed])
    assert total == len(data)
    assert manifest == small_manifest()


def test_read_pack_header_refuses_bad_manifest() -> None:
    data = edit_manifest(small_pack(), rank=0)
    with pytest.raises(InvalidPack, match=r"rank must be an integer"):
        read_pack_header(data[: pack_header_nbytes(data)])
