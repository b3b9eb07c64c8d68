"""The pack format: a safetensors file whose tensors are LoRA matrices stacked across layers.

Header ``__metadata__``: ``{"format": "loracat-pack", "loracat.manifest": <manifest JSON>}``.
Tensors: ``layers.{module}.lora_A`` ``[L, r, in]`` and ``layers.{module}.lora_B``, laid out
sorted by name, as the ``safetensors`` library itself would lay them out. ``lora_B`` is stored
rank-major, ``[L, r, out]`` (PEFT's ``B`` transposed), since format version 2 (the manifest's
``format_version``), and ``[L, out, r]`` as PEFT has it in version 1; with experts
``[L, E, r, in]`` and ``[L, E, r, out]`` (version 1: ``[L, E, out, r]``). Rank-major is the
layout an engine's slots hold (``engine_plugin.slots``), so a fetching attach copies the pack's
bytes into a slot as they are, a plain copy instead of a transposing gather; the transposition
moved to import and export, off the attach path (:meth:`Pack.module_tensors` gives PEFT's
orientation to exporters, :meth:`Pack.stored_tensors` the bytes as stored). Version-1 packs stay
readable everywhere. A stacked tensor is the per-layer tensors' bytes concatenated in layer
order, so stacking and splitting are byte copies and slices.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

import numpy as np

from catalog.errors import InvalidPack
from catalog.pack.container import (
    DTYPE_ITEMSIZE,
    HeaderLayout,
    TensorBytes,
    as_byte_view,
    header_bytes,
    header_nbytes,
    loads_strict_json,
    parse_header,
)
from catalog.pack.manifest import PACK_FORMAT, ModuleSpec, PackManifest

#: Unsigned integer types by element size: elements are moved as bits, never as floats.
UNSIGNED_BY_ITEMSIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

#: Largest header a pack may have: a few thousand tensor entries and the manifest fit easily,
#: and it bounds what a streaming validator buffers before it can judge a push.
MAX_PACK_HEADER_BYTES = 8 * 1024 * 1024
METADATA_FORMAT_KEY = "format"
METADATA_MANIFEST_KEY = "loracat.manifest"


class SwappedMatrices:
    """A byte part of ``lora_B`` in PEFT's orientation, whole ``[rows, columns]`` matrices,
    that is written transposed (``[columns, rows]`` each, bit-exact: elements move as unsigned
    integers). The transposition is deferred to the write, so that a pack written into a
    caller's buffer (:meth:`PackPlan.write_into`) moves these bytes once, straight into place.

    Raises:
        InvalidPack: ``source`` is not a whole number of ``[rows, columns]`` matrices.
    """

    __slots__ = ("_matrices", "nbytes")

    def __init__(self, source: bytes | memoryview, itemsize: int, rows: int, columns: int) -> None:
        nbytes = memoryview(source).nbytes
        matrix_nbytes = rows * columns * itemsize
        if not matrix_nbytes or nbytes % matrix_nbytes:
            _fail(f"a lora_B part is not whole [{rows}, {columns}] matrices")
        #: The transposed view (no copy yet): [n, columns, rows] over the source's bytes, as
        #: one strided array (a plan makes one per layer and module: 168 for a dense rank-16
        #: adapter of 24 layers, where frombuffer + reshape + swapaxes cost 0.9 us each).
        self._matrices = np.ndarray(  # shape, dtype, buffer, offset, strides (positional:
            (nbytes // matrix_nbytes, columns, rows),  # keywords cost numpy 0.25 us more)
            UNSIGNED_BY_ITEMSIZE[itemsize],
            source,
            0,
            (matrix_nbytes, itemsize, columns * itemsize),
        )
        self.nbytes = nbytes

    def write_into(self, destination: memoryview) -> None:
        """Write the transposed matrices into ``destination`` (exactly ``nbytes``, writable)."""
        out = np.frombuffer(destination, dtype=self._matrices.dtype)
        np.copyto(out.reshape(self._matrices.shape), self._matrices)

    def write_range(self, destination: memoryview, start: int, stop: int) -> None:
        """Write bytes ``start:stop`` of the transposed matrices into ``destination`` (exactly
        ``stop - start`` bytes, writable): a window of the output that may begin and end
        inside a matrix, or inside one of its rows (see ``catalog.pack.aligned_writes``).

        Raises:
            ValueError: the range is outside ``0:nbytes``, does not fall on element
                boundaries, or ``destination`` is not ``stop - start`` bytes.
        """
        matrices = self._matrices
        item = matrices.itemsize
        if not 0 <= start <= stop <= self.nbytes or start % item or stop % item:
            raise ValueError(f"bytes {start}:{stop} of {self.nbytes} are not whole elements")
        if destination.nbytes != stop - start:
            raise ValueError(f"{destination.nbytes} bytes cannot hold bytes {start}:{stop}")
        out = np.frombuffer(destination, dtype=matrices.dtype)
        _, columns, rows = matrices.shape  # each output matrix: `columns` rows of `rows`
        element, end, at = start // item, stop // item, 0
        while element < end:
            matrix, within = divmod(element, columns * rows)
            row, column = divmod(within, rows)
            if column or end - element < rows:  # a partial row
                count = min(rows - column, end - element)
                out[at : at + count] = matrices[matrix, row, column : column + count]
            else:  # whole rows of this matrix
                whole = min((end - element) // rows, columns - row)
                count = whole * rows
                np.copyto(
                    out[at : at + count].reshape(whole, rows), matrices[matrix, row : row + whole]
                )
            element += count
            at += count

    def materialize(self) -> memoryview:
        """The transposed bytes, in a new buffer (empty for a part of no matrices)."""
        # Flattened to bytes by numpy, not memoryview.cast: cast refuses a zero-sized view.
        return np.ascontiguousarray(self._matrices).reshape(-1).view(np.uint8).data


#: A byte part of a tensor: bytes as they are, or ``lora_B`` matrices transposed when written.
Part = bytes | memoryview | SwappedMatrices
#: One tensor to write as a list of byte parts (concatenated in order).
TensorParts = tuple[str, str, Sequence[int], Sequence[Part]]


def _part_nbytes(part: Part) -> int:
    return part.nbytes if isinstance(part, SwappedMatrices) else memoryview(part).nbytes


@dataclass(frozen=True)
class PackPlan:
    """A pack laid out but not yet written: its header (computed first) and its tensors' byte
    parts in data order, views of the caller's buffers. :meth:`tobytes` assembles it;
    :meth:`write_into` writes it into a buffer of exactly :attr:`nbytes` (such as a mapping
    of a file that size), each byte moved once. The parts' buffers must stay unchanged until
    then."""

    header: bytes
    parts: tuple[Part, ...]
    nbytes: int

    def write_into(self, buffer: memoryview) -> None:
        """Write the pack into ``buffer`` (writable, contiguous).

        Raises:
            ValueError: ``buffer`` is not exactly :attr:`nbytes` long.
        """
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        if view.nbytes != self.nbytes:
            raise ValueError(f"a pack of {self.nbytes} bytes cannot fill {view.nbytes} bytes")
        position = len(self.header)
        view[:position] = self.header
        for part in self.parts:
            size = _part_nbytes(part)
            if isinstance(part, SwappedMatrices):
                part.write_into(view[position : position + size])
            else:
                view[position : position + size] = memoryview(part).cast("B")
            position += size

    def tobytes(self) -> bytes:
        """The pack's bytes."""
        return b"".join(
            [
                self.header,
                *(p.materialize() if isinstance(p, SwappedMatrices) else p for p in self.parts),
            ]
        )


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


def lora_a_name(module: str) -> str:
    return f"layers.{module}.lora_A"


def lora_b_name(module: str) -> str:
    return f"layers.{module}.lora_B"


def expected_tensors(manifest: PackManifest) -> dict[str, tuple[int, ...]]:
    """Every tensor name the manifest implies, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for m in manifest.modules:
        shapes[lora_a_name(m.name)] = m.shape_a
        shapes[lora_b_name(m.name)] = manifest.stored_shape_b(m)
    return shapes


def swap_last_axes(tensor: TensorBytes) -> TensorBytes:
    """A bit-exact copy of ``tensor`` with its last two axes swapped (``[..., m, n]`` ->
    ``[..., n, m]``): how ``lora_B`` moves between PEFT's orientation and the rank-major one."""
    *outer, rows, columns = tensor.shape
    swapped = SwappedMatrices(tensor.data, tensor.itemsize, rows, columns).materialize()
    return TensorBytes(tensor.dtype, (*outer, columns, rows), swapped)


class Pack:
    """A validated, read-only view over the bytes of one pack. Tensors are zero-copy views into
    the buffer given to :func:`read_pack`, which must stay unchanged while the pack is used."""

    __slots__ = ("_data_offset", "_tensors", "buffer", "manifest", "nbytes")

    def __init__(
        self,
        manifest: PackManifest,
        buffer: memoryview,
        tensors: dict[str, TensorBytes],
        data_offset: int,
    ) -> None:
        self.manifest = manifest
        self.buffer = buffer
        self.nbytes = buffer.nbytes
        self._tensors = tensors
        self._data_offset = data_offset

    def __repr__(self) -> str:
        return (
            f"Pack(base_id={self.manifest.base_id!r}, modules={len(self.manifest.modules)}, "
            f"nbytes={self.nbytes})"
        )

    @property
    def data_offset(self) -> int:
        """Where the tensor data section starts (8 + header length)."""
        return self._data_offset

    def tensor_names(self) -> list[str]:
        """Tensor names in data-section order."""
        return list(self._tensors)

    def tensor(self, name: str) -> TensorBytes:
        """Raises: KeyError when the pack has no such tensor."""
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"pack has no tensor {name!r}") from None

    def module_tensors(self, module: str) -> tuple[TensorBytes, TensorBytes]:
        """``(lora_A, lora_B)`` of ``module``, stacked across its layers, ``lora_B`` in PEFT's
        orientation ``[L, (E,) out, r]``: a view of the pack's bytes for a format-1 pack, a
        transposed copy for a rank-major one (for exporters; an engine wants
        :meth:`stored_tensors`).

        Raises:
            KeyError: the pack does not adapt ``module``.
        """
        lora_a, lora_b, rank_major = self.stored_tensors(module)
        return lora_a, swap_last_axes(lora_b) if rank_major else lora_b

    def stored_tensors(self, module: str) -> tuple[TensorBytes, TensorBytes, bool]:
        """``(lora_A, lora_B, rank_major)`` of ``module`` as stored, views of the pack's
        bytes: ``lora_B`` is ``[L, (E,) r, out]`` when ``rank_major`` (format 2), else
        ``[L, (E,) out, r]``.

        Raises:
            KeyError: the pack does not adapt ``module``.
        """
        self.manifest.module(module)
        return (
            self._tensors[lora_a_name(module)],
            self._tensors[lora_b_name(module)],
            self.manifest.lora_b_rank_major,
        )


def _manifest_from_layout(layout: HeaderLayout) -> PackManifest:
    """Check the header against the pack rules and return its manifest."""
    metadata = layout.metadata
    if metadata.get(METADATA_FORMAT_KEY) != PACK_FORMAT:
        _fail(
            f"not a loracat pack: __metadata__ format is "
            f"{metadata.get(METADATA_FORMAT_KEY)!r}, expected {PACK_FORMAT!r}"
        )
    if METADATA_MANIFEST_KEY not in metadata:
        _fail(f"pack manifest missing: no {METADATA_MANIFEST_KEY!r} in __metadata__")
    extra = sorted(set(metadata) - {METADATA_FORMAT_KEY, METADATA_MANIFEST_KEY})
    if extra:
        _fail(f"unknown __metadata__ keys {extra}")
    manifest = PackManifest.from_json(
        loads_strict_json(metadata[METADATA_MANIFEST_KEY], "pack manifest")
    )
    _check_tensors_match(manifest, {n: (s[0], s[1]) for n, s in layout.specs.items()})
    return manifest


def _check_tensors_match(
    manifest: PackManifest, tensors: Mapping[str, tuple[str, tuple[int, ...]]]
) -> None:
    expected = expected_tensors(manifest)
    for name, shape in expected.items():
        if name not in tensors:
            _fail(f"manifest names tensor {name!r} but the pack does not have it")
        dtype, actual = tensors[name]
        if tuple(actual) != shape:
            _fail(
                f"tensor {name!r} has shape {list(actual)} but the manifest implies {list(shape)}"
            )
        if dtype != manifest.dtype:
            _fail(f"tensor {name!r} is {dtype} but the manifest says {manifest.dtype}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        _fail(f"tensor {extra[0]!r} is not named by the manifest")


def read_pack_header(data_prefix: bytes | memoryview) -> tuple[PackManifest, int]:
    """Validate a pack from its first bytes only: the header and the manifest.

    Returns the manifest and the total length the whole pack must have. Use
    :func:`pack_header_nbytes` to learn how many bytes to buffer first.

    Raises:
        InvalidPack: too few bytes for the header, or a malformed or inconsistent header.
    """
    layout = parse_header(as_byte_view(data_prefix), max_header=MAX_PACK_HEADER_BYTES)
    return _manifest_from_layout(layout), layout.total_nbytes


def pack_header_nbytes(data_prefix: bytes | memoryview) -> int:
    """How many leading bytes :func:`read_pack_header` needs (from the first 8 bytes).

    Raises:
        InvalidPack: fewer than 8 bytes, or a header length above the pack limit.
    """
    return header_nbytes(as_byte_view(data_prefix), max_header=MAX_PACK_HEADER_BYTES)


def read_pack(data: bytes | bytearray | memoryview) -> Pack:
    """Parse and fully validate a pack; tensors are views into ``data`` (no copy).

    Raises:
        InvalidPack: naming the problem: a malformed container (header length, JSON, offsets,
            truncation), a missing or invalid manifest, or tensors that contradict it.
    """
    view = as_byte_view(data)
    return _pack_of(view, *_parse(view))


def _parse(view: memoryview) -> tuple[PackManifest, _Specs, int]:
    """Validate a whole pack's header: its manifest, tensor specs in data order, and where the
    data section starts. Raises ``InvalidPack``."""
    layout = parse_header(view, max_header=MAX_PACK_HEADER_BYTES, file_nbytes=view.nbytes)
    manifest = _manifest_from_layout(layout)
    specs = list(layout.specs.items())  # in data order
    return manifest, specs, layout.header_nbytes


#: Tensor specs in data order: (name, (dtype, shape, begin, end)).
_Specs = list[tuple[str, tuple[str, tuple[int, ...], int, int]]]


def _pack_of(view: memoryview, manifest: PackManifest, specs: _Specs, base: int) -> Pack:
    tensors = {
        name: TensorBytes(dtype, shape, view[base + begin : base + end])
        for name, (dtype, shape, begin, end) in specs
    }
    return Pack(manifest, view, tensors, base)


class ParsedHeaders:
    """Validated pack headers kept by their bytes, so that reading a pack whose header was
    seen before skips the JSON parse and the manifest validation (0.26 ms for the rank-16
    seven-module pack of the 0.5B shapes, against 0.04 ms reusing it). A header names no
    digest: every revision that a trainer pushes with the same config and shapes has the same
    header, so an engine's hot swap to a new revision reuses its predecessor's parse.

    A kept parse serves only bytes of the same length whose header is byte-identical to the
    one parsed: validation is a function of exactly those (never of the tensors' bytes), so
    a kept parse never serves a wrong view. Thread safe; keeps the ``capacity`` most
    recently used.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        # (header bytes, pack length) -> the parse of every pack that has them
        self._parsed: OrderedDict[tuple[bytes, int], tuple[PackManifest, _Specs]] = OrderedDict()

    def read(self, data: bytes | bytearray | memoryview) -> Pack:
        """As :func:`read_pack`, reusing the parse kept for the same header and length.

        Raises:
            InvalidPack: as :func:`read_pack`.
        """
        view = as_byte_view(data)
        try:
            base = header_nbytes(view, max_header=MAX_PACK_HEADER_BYTES)
        except InvalidPack:
            base = view.nbytes + 1  # not a header: the full parse below says why
        if base <= view.nbytes:
            key = (bytes(view[:base]), view.nbytes)
            with self._lock:
                kept = self._parsed.get(key)
                if kept is not None:
                    self._parsed.move_to_end(key)
            if kept is not None:
                return _pack_of(view, *kept, base)
        manifest, specs, base = _parse(view)
        with self._lock:
            key = (bytes(view[:base]), view.nbytes)
            self._parsed[key] = (manifest, specs)
            self._parsed.move_to_end(key)
            while len(self._parsed) > self._capacity:
                self._parsed.popitem(last=False)
        return _pack_of(view, manifest, specs, base)


def write_pack(manifest: PackManifest, tensors: Mapping[str, TensorBytes]) -> bytes:
    """Serialize a pack from its manifest and its stacked tensors.

    Raises:
        InvalidPack: a tensor is missing, extra, or of a shape or dtype the manifest contradicts.
    """
    return assemble_pack(manifest, [(n, t.dtype, t.shape, [t.data]) for n, t in tensors.items()])


def convert_pack(data: bytes | bytearray | memoryview | Pack, format_version: int) -> bytes:
    """The same adapter as a pack of ``format_version`` (``lora_B`` transposed between PEFT's
    orientation and the rank-major one where the versions differ; every other byte as it was):
    for readers that know only format 1, and for tests of both layouts.

    Raises:
        InvalidPack: ``data`` is not a valid pack, or the version is not one this reader knows.
    """
    pack = data if isinstance(data, Pack) else read_pack(data)
    manifest = replace(pack.manifest, format_version=format_version)
    tensors: dict[str, TensorBytes] = {}
    for module in manifest.modules:
        lora_a, lora_b, rank_major = pack.stored_tensors(module.name)
        tensors[lora_a_name(module.name)] = lora_a
        same = rank_major == manifest.lora_b_rank_major
        tensors[lora_b_name(module.name)] = lora_b if same else swap_last_axes(lora_b)
    return write_pack(manifest, tensors)


def assemble_pack(manifest: PackManifest, tensors: Sequence[TensorParts]) -> bytes:
    """Serialize a pack whose tensors are given as byte parts (stacking without a staging copy).

    Raises:
        InvalidPack: the tensors contradict the manifest.
    """
    return plan_pack(manifest, tensors).tobytes()


def plan_pack(manifest: PackManifest, tensors: Sequence[TensorParts]) -> PackPlan:
    """Lay out a pack whose tensors are given as byte parts, without writing it yet (see
    :class:`PackPlan`).

    Raises:
        InvalidPack: the tensors contradict the manifest, or a tensor's parts do not add up
            to its shape.
    """
    _check_tensors_match(
        manifest, {name: (dtype, tuple(shape)) for name, dtype, shape, _ in tensors}
    )
    metadata = {
        METADATA_FORMAT_KEY: PACK_FORMAT,
        METADATA_MANIFEST_KEY: manifest.to_json_text(),
    }
    ordered = sorted(tensors, key=lambda t: t[0])
    sized = [
        (name, dtype, shape, sum(map(_part_nbytes, parts))) for name, dtype, shape, parts in ordered
    ]
    header = header_bytes(metadata, sized)
    parts = tuple(part for *_, tensor_parts in ordered for part in tensor_parts)
    return PackPlan(header, parts, len(header) + sum(size for *_, size in sized))


def rank_major_parts(
    module: ModuleSpec, dtype: str, parts: Sequence[bytes | memoryview]
) -> list[Part]:
    """``lora_B`` byte parts in PEFT's orientation (each a whole number of ``[out, r]``
    matrices: a layer's, an expert's, or a layer's experts) as format 2 stores them, each
    matrix to be transposed to ``[r, out]`` when the pack is written (:class:`SwappedMatrices`).

    Raises:
        InvalidPack: a part is not a whole number of ``module``'s ``[out, r]`` matrices.
    """
    out, rank = module.out_features, module.rank
    swapped: list[Part] = []
    for part in parts:
        try:
            swapped.append(SwappedMatrices(part, DTYPE_ITEMSIZE[dtype], out, rank))
        except InvalidPack:
            _fail(f"a lora_B part of module {module.name!r} is not whole [{out}, {rank}] matrices")
    return swapped


def stacked_parts(module: ModuleSpec, per_layer: Sequence[TensorBytes]) -> list[memoryview]:
    """Byte parts of a stacked tensor: the per-layer tensors in layer order.

    Raises:
        InvalidPack: the number of per-layer tensors differs from the module's layer count.
    """
    if len(per_layer) != len(module.layers):
        _fail(
            f"module {module.name!r} has {len(module.layers)} layers "
            f"but {len(per_layer)} tensors were given"
        )
    return [t.data for t in per_layer]
