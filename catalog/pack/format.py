"""Pack format v1: a safetensors file whose tensors are LoRA matrices stacked across layers.

Header ``__metadata__``: ``{"format": "loracat-pack", "loracat.manifest": <manifest JSON>}``.
Tensors: ``layers.{module}.lora_A`` ``[L, r, in]`` and ``layers.{module}.lora_B``
``[L, out, r]`` (``[L, E, r, in]`` / ``[L, E, out, r]`` for experts), laid out sorted by name, as
the ``safetensors`` library itself would lay them out. A stacked tensor is the per-layer tensors'
bytes concatenated in layer order, so stacking and splitting are byte copies and slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NoReturn

from catalog.errors import InvalidPack
from catalog.pack.container import (
    HeaderLayout,
    TensorBytes,
    as_byte_view,
    header_nbytes,
    loads_strict_json,
    parse_header,
    serialize,
)
from catalog.pack.manifest import PACK_FORMAT, ModuleSpec, PackManifest

#: Largest header a pack may have: a few thousand tensor entries and the manifest fit easily,
#: and it bounds what a streaming validator buffers before it can judge a push.
MAX_PACK_HEADER_BYTES = 8 * 1024 * 1024
METADATA_FORMAT_KEY = "format"
METADATA_MANIFEST_KEY = "loracat.manifest"

#: One tensor to write as a list of byte parts (concatenated in order).
TensorParts = tuple[str, str, Sequence[int], Sequence[bytes | memoryview]]


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
        shapes[lora_b_name(m.name)] = m.shape_b
    return shapes


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
        """``(lora_A, lora_B)`` of ``module``, stacked across its layers.

        Raises:
            KeyError: the pack does not adapt ``module``.
        """
        self.manifest.module(module)
        return self._tensors[lora_a_name(module)], self._tensors[lora_b_name(module)]


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
    layout = parse_header(view, max_header=MAX_PACK_HEADER_BYTES, file_nbytes=view.nbytes)
    manifest = _manifest_from_layout(layout)
    base = layout.header_nbytes
    tensors = {
        name: TensorBytes(dtype, shape, view[base + begin : base + end])
        for name, (dtype, shape, begin, end) in sorted(
            layout.specs.items(), key=lambda item: item[1][2:]
        )
    }
    return Pack(manifest, view, tensors, base)


def write_pack(manifest: PackManifest, tensors: Mapping[str, TensorBytes]) -> bytes:
    """Serialize a pack from its manifest and its stacked tensors.

    Raises:
        InvalidPack: a tensor is missing, extra, or of a shape or dtype the manifest contradicts.
    """
    return assemble_pack(manifest, [(n, t.dtype, t.shape, [t.data]) for n, t in tensors.items()])


def assemble_pack(manifest: PackManifest, tensors: Sequence[TensorParts]) -> bytes:
    """Serialize a pack whose tensors are given as byte parts (stacking without a staging copy).

    Raises:
        InvalidPack: the tensors contradict the manifest.
    """
    _check_tensors_match(
        manifest, {name: (dtype, tuple(shape)) for name, dtype, shape, _ in tensors}
    )
    metadata = {
        METADATA_FORMAT_KEY: PACK_FORMAT,
        METADATA_MANIFEST_KEY: manifest.to_json_text(),
    }
    return serialize(metadata, sorted(tensors, key=lambda t: t[0]))


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
