"""Property tests: mutated packs and PEFT files either parse consistently or raise InvalidPack."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.errors import InvalidPack
from catalog.pack import (
    DTYPE_ITEMSIZE,
    TensorBytes,
    expected_tensors,
    pack_from_peft_tensors,
    pack_header_nbytes,
    read_pack,
    read_pack_header,
)
from catalog.pack.container import serialize
from tests.pack.synth import raw_safetensors, small_manifest, small_pack, split_pack

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
VALID_PACKS = [
    small_pack(),
    small_pack(dtype="BF16"),
]
_HEADER_END = [pack_header_nbytes(p) for p in VALID_PACKS]


def _check_consistent(data: bytes) -> None:
    """``data`` parses to a pack that is consistent with its manifest, or raises InvalidPack."""
    try:
        pack = read_pack(data)
    except InvalidPack:
        return
    assert pack.nbytes == len(data)
    shapes = expected_tensors(pack.manifest)
    assert sorted(pack.tensor_names()) == sorted(shapes)
    covered = pack.data_offset
    for name in pack.tensor_names():
        tensor = pack.tensor(name)
        assert tensor.shape == shapes[name]
        assert tensor.dtype == pack.manifest.dtype
        assert tensor.nbytes == math.prod(tensor.shape) * DTYPE_ITEMSIZE[tensor.dtype]
        covered += tensor.nbytes
    assert covered == len(data)
    try:
        manifest, total = read_pack_header(data[: pack.data_offset])
    except InvalidPack as exc:  # pragma: no cover - would be a bug
        raise AssertionError(f"header refused after the whole pack passed: {exc}") from exc
    assert (manifest, total) == (pack.manifest, len(data))


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(
        st.just("set_header"), st.integers(0, 10**6), st.sampled_from(b'{}[]",:0123456789 -eE.')
    ),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
)


def _mutate(data: bytes, header_end: int, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, position, value in ops:
        if not buf:
            break
        at = position % len(buf)
        if op == "set":
            buf[at] = value
        elif op == "set_header":
            buf[position % min(header_end, len(buf))] = value
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf.insert(at, value)
        else:
            del buf[at : at + value]
    return bytes(buf)


@FUZZ
@given(which=st.integers(0, len(VALID_PACKS) - 1), ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_packs_parse_or_raise_invalid_pack(
    which: int, ops: list[tuple[str, int, int]]
) -> None:
    _check_consistent(_mutate(VALID_PACKS[which], _HEADER_END[which], ops))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _set_path(doc: Any, path: list[int], value: Any) -> Any:
    """Replace the node chosen by ``path`` (indices into dict keys / list items) with ``value``."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    if isinstance(doc, dict):
        key = sorted(doc)[path[0] % len(doc)]
        doc[key] = _set_path(doc[key], path[1:], value)
    else:
        i = path[0] % len(doc)
        doc[i] = _set_path(doc[i], path[1:], value)
    return doc


@FUZZ
@given(path=st.lists(st.integers(0, 50), max_size=4), value=json_values)
def test_mutated_manifest_values_parse_or_raise_invalid_pack(path: list[int], value: Any) -> None:
    header, body = split_pack(VALID_PACKS[0])
    manifest = json.loads(header["__metadata__"]["loracat.manifest"])
    manifest = _set_path(manifest, path, value)
    header["__metadata__"]["loracat.manifest"] = json.dumps(manifest)
    _check_consistent(raw_safetensors(header, body))


@FUZZ
@given(path=st.lists(st.integers(0, 50), max_size=4), value=json_values)
def test_mutated_header_values_parse_or_raise_invalid_pack(path: list[int], value: Any) -> None:
    header, body = split_pack(VALID_PACKS[1])
    header = _set_path(header, [1 + path[0] if path else 1, *path[1:]], value)
    _check_consistent(raw_safetensors(header, body))


def _synthetic_peft_file() -> bytes:
    prefix = "base_model.model.model.layers"
    parts = []
    for layer in (0, 1):
        for module, (out_f, in_f) in {"self_attn.q_proj": (6, 6), "mlp.down_proj": (6, 10)}.items():
            parts.append(
                (f"{prefix}.{layer}.{module}.lora_A.weight", "F32", (2, in_f), [bytes(8 * in_f)])
            )
            parts.append(
                (f"{prefix}.{layer}.{module}.lora_B.weight", "F32", (out_f, 2), [bytes(8 * out_f)])
            )
    return serialize({"format": "pt"}, sorted(parts))


PEFT_FILE = _synthetic_peft_file()
PEFT_CONFIG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj", "down_proj"],
}


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_peft_files_import_or_raise_invalid_pack(ops: list[tuple[str, int, int]]) -> None:
    from catalog.pack.container import parse_safetensors

    data = _mutate(PEFT_FILE, pack_header_nbytes(PEFT_FILE), ops)
    try:
        tensors: dict[str, TensorBytes] = dict(parse_safetensors(data).tensors)
        pack_bytes = pack_from_peft_tensors(PEFT_CONFIG, tensors, "base")
    except InvalidPack:
        return
    _check_consistent(pack_bytes)
    assert read_pack(pack_bytes).nbytes == len(pack_bytes)


def test_fuzz_inputs_start_valid() -> None:
    for data in VALID_PACKS:
        _check_consistent(data)
        read_pack(data)
    assert read_pack(VALID_PACKS[0]).manifest == small_manifest()
