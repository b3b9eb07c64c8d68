"""A strict safetensors container: parse into zero-copy views, serialize from byte parts.

The layout (https://github.com/huggingface/safetensors) is an 8-byte little-endian header length
N, N bytes of JSON, then the data section. Everything here treats the input as hostile: every
number in the header is checked against the bytes actually present before it is used, so a
header can never make us allocate or slice beyond the file. Parsing never copies tensor data;
each tensor is a ``memoryview`` into the caller's buffer.

Serialization writes what the ``safetensors`` library itself writes (compact JSON, metadata
first, tensors sorted by name within one dtype, header padded with spaces to 8 bytes), so a PEFT
file exported from a pack is byte-identical to the one PEFT saved.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from catalog.errors import InvalidPack

#: Bytes per element of every dtype we can parse (sub-byte float formats are not accepted).
DTYPE_ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
#: Largest JSON header accepted from an arbitrary safetensors file (PEFT MoE files are big).
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_TENSOR_NDIM = 8
_HEADER_LEN = struct.Struct("<Q")
_HEADER_ALIGN = 8
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True, slots=True)
class TensorBytes:
    """One tensor as raw row-major bytes: a safetensors dtype name, a shape and a byte view.

    Raises:
        InvalidPack: the dtype is unknown, the shape is not a tuple of non-negative ints, or
            the data length is not ``prod(shape) * itemsize``.
    """

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_ITEMSIZE:
            raise InvalidPack(f"unknown dtype {self.dtype!r}")
        shape = tuple(self.shape)
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise InvalidPack(f"shape {list(shape)!r} is not a list of non-negative integers")
        data = self.data if isinstance(self.data, memoryview) else memoryview(self.data)
        if data.ndim != 1 or data.format != "B":
            if not data.c_contiguous:
                raise InvalidPack("tensor data must be a contiguous buffer")
            data = data.cast("B")
        expected = math.prod(shape) * DTYPE_ITEMSIZE[self.dtype]
        if data.nbytes != expected:
            raise InvalidPack(
                f"{self.dtype} tensor of shape {list(shape)} needs {expected} bytes, "
                f"got {data.nbytes}"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "data", data)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    def index(self, i: int) -> TensorBytes:
        """The ``i``-th slice along the first axis, as a view (no copy).

        Raises:
            IndexError: the tensor is a scalar or ``i`` is out of range.
        """
        if not self.shape:
            raise IndexError("cannot index a scalar tensor")
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"index {i} out of range for first axis of {self.shape[0]}")
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return TensorBytes(self.dtype, self.shape[1:], self.data[i * row : (i + 1) * row])

    def tobytes(self) -> bytes:
        return self.data.tobytes()

    @classmethod
    def _of_checked_spec(cls, dtype: str, shape: tuple[int, ...], data: memoryview) -> TensorBytes:
        """A tensor whose spec :func:`parse_header` has already checked against the file: a
        known dtype, a shape of non-negative ints, ``data`` a slice of a flat byte view that is
        exactly ``prod(shape) * itemsize`` long (its data_offsets' span, checked to lie inside
        the file). Those are every check of ``__post_init__``, so it is not run twice: on a
        336-tensor PEFT file the second run was a fifth of the import's plan (~0.4 ms)."""
        tensor = object.__new__(cls)
        set_field = object.__setattr__  # frozen: no plain setattr
        set_field(tensor, "dtype", dtype)
        set_field(tensor, "shape", shape)
        set_field(tensor, "data", data)
        return tensor


@dataclass(frozen=True)
class SafetensorsFile:
    """A parsed safetensors file: its ``__metadata__`` and its tensors in data-section order."""

    metadata: dict[str, str]
    tensors: dict[str, TensorBytes] = field(repr=False)
    header_nbytes: int
    nbytes: int


@dataclass(frozen=True)
class HeaderLayout:
    """What the header alone says: metadata, tensor specs and the total file length."""

    metadata: dict[str, str]
    #: name -> (dtype, shape, begin, end), in data-section order (by offsets).
    specs: dict[str, tuple[str, tuple[int, ...], int, int]]
    header_nbytes: int  # 8 + N: where the data section starts
    total_nbytes: int


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _non_negative_ints(values: list[Any]) -> bool:
    """Every value is a non-negative int (not a bool): :func:`_is_int` per value, written as one
    loop with the plain-int case first, since a PEFT file's header has ~1000 such numbers."""
    for value in values:  # noqa: SIM110 (a loop: all() over a generator is slower here)
        if not (type(value) is int or _is_int(value)) or value < 0:
            return False
    return True


def _reject_constant(name: str) -> NoReturn:
    raise InvalidPack(f"header JSON contains the non-standard constant {name}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidPack(f"duplicate JSON key {key!r}")
        obj[key] = value
    return obj


def loads_strict_json(text: bytes | str, what: str) -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity and pathological nesting.

    Raises:
        InvalidPack: naming ``what`` when the text is not valid strict JSON.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_object, parse_constant=_reject_constant)
    except InvalidPack as exc:
        raise InvalidPack(f"{what}: {exc.message}") from None
    except UnicodeDecodeError:
        raise InvalidPack(f"{what} is not valid UTF-8") from None
    except RecursionError:
        raise InvalidPack(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints beyond the digit limit
        raise InvalidPack(f"{what} is not valid JSON: {exc}") from None


def header_nbytes(data_prefix: bytes | memoryview, *, max_header: int = MAX_HEADER_BYTES) -> int:
    """How many leading bytes (8 + N) hold the length field and the JSON header.

    Raises:
        InvalidPack: fewer than 8 bytes, or a header length above ``max_header``.
    """
    if len(data_prefix) < _HEADER_LEN.size:
        _fail(f"file is {len(data_prefix)} bytes, shorter than the 8-byte header length")
    (length,) = _HEADER_LEN.unpack_from(data_prefix, 0)
    if length > max_header:
        _fail(f"header length {length} exceeds the limit of {max_header} bytes")
    if length < 2:
        _fail(f"header length {length} is too small for a JSON object")
    return int(_HEADER_LEN.size + length)


def parse_header(
    data_prefix: bytes | memoryview,
    *,
    max_header: int = MAX_HEADER_BYTES,
    file_nbytes: int | None = None,
) -> HeaderLayout:
    """Validate the header from the first bytes of a file (the data section is not needed).

    ``file_nbytes``, when known, bounds the header length by the file size.

    Raises:
        InvalidPack: naming the first problem found.
    """
    end = header_nbytes(data_prefix, max_header=max_header)
    if file_nbytes is not None and end > file_nbytes:
        _fail(
            f"header length {end - _HEADER_LEN.size} exceeds the file size of {file_nbytes} bytes"
        )
    if len(data_prefix) < end:
        _fail(f"header needs {end} bytes, only {len(data_prefix)} available")
    raw = bytes(data_prefix[_HEADER_LEN.size : end])
    header = loads_strict_json(raw, "header")
    if not isinstance(header, dict):
        _fail("header is not a JSON object")
    metadata_obj = header.pop("__metadata__", {})
    if not isinstance(metadata_obj, dict) or not all(
        isinstance(v, str) for v in metadata_obj.values()
    ):
        _fail("__metadata__ is not a map of strings to strings")
    available = None if file_nbytes is None else file_nbytes - end
    specs: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, spec in header.items():
        specs[name] = parsed = _parse_tensor_spec(name, spec)
        if available is not None and parsed[3] > available:
            _fail(
                f"tensor {name!r}: data_offsets {list(parsed[2:])} run past the end of "
                f"the data section ({available} bytes)"
            )
    data_nbytes, specs = _check_offsets(specs)
    total = end + data_nbytes
    # A short file was refused above (some tensor ran past the end); only a long one is left.
    if file_nbytes is not None and file_nbytes > total:
        _fail(f"file has {file_nbytes - total} trailing bytes after the data section")
    return HeaderLayout(dict(metadata_obj), specs, end, total)


def _parse_tensor_spec(name: str, spec: object) -> tuple[str, tuple[int, ...], int, int]:
    if not name:
        _fail("tensor with an empty name")
    if not isinstance(spec, dict) or spec.keys() != _TENSOR_KEYS:
        _fail(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    itemsize = DTYPE_ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
    if itemsize is None:
        _fail(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_NDIM or not _non_negative_ints(shape):
        _fail(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not _non_negative_ints(offsets)
        or offsets[0] > offsets[1]
    ):
        _fail(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        _fail(
            f"tensor {name!r}: data_offsets span {end - begin} bytes but {dtype} "
            f"{shape} needs {expected}"
        )
    return dtype, tuple(shape), begin, end


def _check_offsets(
    specs: Mapping[str, tuple[str, tuple[int, ...], int, int]],
) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """The tensors must tile the data section exactly; returns its length and the specs in
    data-section order (sorted once here, for every reader of the layout)."""
    position = 0
    ordered = dict(sorted(specs.items(), key=lambda item: item[1][2:]))
    for name, (_, _, begin, end) in ordered.items():
        if begin < position:
            _fail(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap the previous tensor")
        if begin > position:
            _fail(f"tensor {name!r}: data_offsets [{begin}, {end}] leave a hole at {position}")
        position = end
    return position, ordered


def parse_safetensors(
    data: bytes | bytearray | memoryview, *, max_header: int = MAX_HEADER_BYTES
) -> SafetensorsFile:
    """Parse and validate a whole safetensors file into zero-copy tensor views.

    Raises:
        InvalidPack: naming the first problem (header, offsets, truncation, trailing bytes).
    """
    view = as_byte_view(data)
    layout = parse_header(view, max_header=max_header, file_nbytes=view.nbytes)
    base = layout.header_nbytes
    checked = TensorBytes._of_checked_spec
    tensors = {
        name: checked(dtype, shape, view[base + begin : base + end])
        for name, (dtype, shape, begin, end) in layout.specs.items()
    }
    return SafetensorsFile(layout.metadata, tensors, base, view.nbytes)


def as_byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A read-only, flat, unsigned-byte view of ``data``.

    Raises:
        InvalidPack: the buffer is not contiguous.
    """
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.ndim != 1 or view.format != "B":
        if not view.c_contiguous:
            _fail("pack data must be a contiguous buffer")
        view = view.cast("B")
    return view.toreadonly()


def serialize(
    metadata: Mapping[str, str] | None,
    tensors: Iterable[tuple[str, str, Sequence[int], Sequence[bytes | memoryview]]],
) -> bytes:
    """Serialize tensors given as ``(name, dtype, shape, parts)``; a tensor's bytes are its parts
    concatenated, so stacking needs no intermediate buffer. Tensors are laid out in the order
    given; the whole file is built with a single copy of the data.

    Raises:
        InvalidPack: a tensor's parts do not add up to ``prod(shape) * itemsize``.
    """
    return b"".join(serialize_parts(metadata, tensors))


def serialize_parts(
    metadata: Mapping[str, str] | None,
    tensors: Iterable[tuple[str, str, Sequence[int], Sequence[bytes | memoryview]]],
) -> list[bytes | memoryview]:
    """Like :func:`serialize` but returns the file as a list of chunks (the length field and
    header, then the tensor parts), for writing to a file without assembling it in memory
    first.

    Raises:
        InvalidPack: a tensor's parts do not add up to ``prod(shape) * itemsize``.
    """
    tensors = list(tensors)
    sizes = [(n, d, s, sum(memoryview(p).nbytes for p in parts)) for n, d, s, parts in tensors]
    head = header_bytes(metadata, sizes)
    chunks: list[bytes | memoryview] = [head]
    for _, _, _, parts in tensors:
        chunks.extend(parts)
    return chunks


def header_bytes(
    metadata: Mapping[str, str] | None,
    tensors: Iterable[tuple[str, str, Sequence[int], int]],
) -> bytes:
    """The length field and the JSON header of a file whose tensors ``(name, dtype, shape,
    nbytes)`` follow in the order given: what precedes the data section, computable before
    any tensor byte is written (so a file can be written straight into a buffer of its size).

    Raises:
        InvalidPack: a duplicate name, or ``nbytes`` is not ``prod(shape) * itemsize``.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, size in tensors:
        if name in header:
            _fail(f"duplicate tensor name {name!r}")
        expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
        if size != expected:
            _fail(f"tensor {name!r}: {dtype} {list(shape)} needs {expected} bytes, got {size}")
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return _HEADER_LEN.pack(len(text)) + text


def library_order(
    tensors: Mapping[str, TensorBytes],
) -> list[tuple[str, str, Sequence[int], Sequence[bytes | memoryview]]]:
    """Tensors in the order the ``safetensors`` library lays them out for one dtype: by name.

    Raises:
        InvalidPack: the tensors do not share one dtype (the library's cross-dtype order is a
            detail of its version, so we do not imitate it).
    """
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        _fail(f"tensors of mixed dtypes {sorted(dtypes)}")
    return [(name, t.dtype, t.shape, [t.data]) for name, t in sorted(tensors.items())]


def is_decimal(text: str) -> bool:
    """``text`` is a canonical non-negative decimal integer (no sign, no leading zeros)."""
    return bool(_DECIMAL.fullmatch(text))
