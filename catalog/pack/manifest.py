"""The pack manifest: what a pack holds, for whom, and how to scale it.

A manifest is validated when it is built, so an invalid one cannot exist: every count is bounded
(a hostile header cannot make anyone allocate by them), module names are dotted identifiers, and
layers are sorted, unique and inside the base.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from catalog.errors import InvalidPack

PACK_FORMAT = "loracat-pack"
#: The version packs are written in. Version 2 stores ``lora_B`` rank-major (``[L, r, out]``,
#: ``[L, E, r, out]`` for experts), the layout an engine's slots hold, so that attaching is a
#: plain copy of the pack's bytes; version 1 stored it as PEFT does (``[L, out, r]``). Both read.
PACK_FORMAT_VERSION = 2
#: Every version this reader accepts.
READABLE_FORMAT_VERSIONS = (1, 2)
#: safetensors dtypes a pack may hold.
PACK_DTYPES = ("F32", "BF16", "F16")

MAX_RANK = 4096
MAX_LAYERS = 4096
MAX_EXPERTS = 4096
MAX_FEATURES = 1 << 20
MAX_MODULES = 1024
MAX_NAME_LENGTH = 256
MAX_BASE_ID_LENGTH = 1024

#: A module path relative to a decoder layer: dotted identifiers, no numeric parts (a numeric
#: part would be a layer or expert index, which the stacking axes carry instead).
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

_MODULE_KEYS = frozenset(
    {"name", "in_features", "out_features", "rank", "alpha", "layers", "num_experts"}
)
_MANIFEST_KEYS = frozenset(
    {
        "format_version",
        "base_id",
        "rank",
        "alpha",
        "dtype",
        "use_rslora",
        "num_layers",
        "num_experts",
        "modules",
        "source",
    }
)


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        _fail(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_alpha(what: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        _fail(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module, stacked across ``layers``.

    ``name`` is the path inside a decoder layer (``self_attn.q_proj``). Its tensors are
    ``lora_A [len(layers), rank, in_features]`` and ``lora_B``, PEFT's ``B`` per layer
    ``[len(layers), out_features, rank]`` (:attr:`shape_b`), stored rank-major as
    ``[len(layers), rank, out_features]`` (:attr:`shape_bt`, ``B`` transposed) since pack format
    2; with ``num_experts`` E > 0 ``[L, E, rank, in]`` and ``[L, E, out, rank]`` /
    ``[L, E, rank, out]``. Either way the delta a layer's module (expert ``e``) adds to its
    output for input ``x`` is ``scaling * x @ A.T @ B.T`` with ``A = lora_A[l(, e)]``,
    ``B = lora_B[l(, e)]`` in PEFT's orientation: ``in`` and ``out`` are the projection's real
    features, whatever order the base stores its weights in.
    Expert module names are paths without the expert index: ``mlp.experts.gate_up_proj`` (a
    fused parameter), ``block_sparse_moe.experts.w1`` (one linear layer per expert).

    Raises:
        InvalidPack: any field out of range or of the wrong type.
    """

    name: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    layers: tuple[int, ...]
    num_experts: int = 0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or len(self.name) > MAX_NAME_LENGTH
            or not _MODULE_NAME.fullmatch(self.name)
        ):
            _fail(f"module name {self.name!r} is not a dotted identifier path")
        where = f"module {self.name!r}"
        _check_int(f"{where} in_features", self.in_features, 1, MAX_FEATURES)
        _check_int(f"{where} out_features", self.out_features, 1, MAX_FEATURES)
        _check_int(f"{where} rank", self.rank, 1, MAX_RANK)
        _check_int(f"{where} num_experts", self.num_experts, 0, MAX_EXPERTS)
        object.__setattr__(self, "alpha", _check_alpha(f"{where} alpha", self.alpha))
        layers = self.layers
        if not isinstance(layers, tuple | list) or not 1 <= len(layers) <= MAX_LAYERS:
            _fail(f"{where} layers must be a non-empty list of at most {MAX_LAYERS} indices")
        for index in layers:
            _check_int(f"{where} layer index", index, 0, MAX_LAYERS - 1)
        if any(a >= b for a, b in itertools.pairwise(layers)):
            _fail(f"{where} layers must be strictly increasing, got {list(layers)}")
        object.__setattr__(self, "layers", tuple(layers))

    @property
    def shape_a(self) -> tuple[int, ...]:
        """Shape of the stacked ``lora_A`` tensor."""
        experts = (self.num_experts,) if self.num_experts else ()
        return (len(self.layers), *experts, self.rank, self.in_features)

    @property
    def shape_b(self) -> tuple[int, ...]:
        """Shape of the stacked ``lora_B`` in PEFT's orientation (how format 1 stores it)."""
        experts = (self.num_experts,) if self.num_experts else ()
        return (len(self.layers), *experts, self.out_features, self.rank)

    @property
    def shape_bt(self) -> tuple[int, ...]:
        """Shape of the stacked ``lora_B`` rank-major (how format 2 stores it)."""
        experts = (self.num_experts,) if self.num_experts else ()
        return (len(self.layers), *experts, self.rank, self.out_features)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "alpha": self.alpha,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
        }

    @classmethod
    def from_json(cls, d: object) -> ModuleSpec:
        """Raises: InvalidPack on a missing, extra or ill-typed field."""
        if not isinstance(d, dict):
            _fail("module entry is not a JSON object")
        _check_keys("module entry", d, _MODULE_KEYS, optional={"num_experts"})
        layers = d["layers"]
        if not isinstance(layers, list):
            _fail(f"module {d['name']!r} layers is not a list")
        return cls(
            name=d["name"],
            in_features=d["in_features"],
            out_features=d["out_features"],
            rank=d["rank"],
            alpha=d["alpha"],
            layers=tuple(layers),
            num_experts=d.get("num_experts", 0),
        )


def _check_keys(
    what: str, d: Mapping[str, object], allowed: frozenset[str], optional: set[str]
) -> None:
    missing = sorted(allowed - optional - set(d))
    if missing:
        _fail(f"{what} is missing {', '.join(missing)}")
    extra = sorted(set(d) - allowed)
    if extra:
        _fail(f"{what} has unknown fields {', '.join(extra)}")


@dataclass(frozen=True)
class PackManifest:
    """What a pack holds: the base it was trained for, its modules and how to scale them.

    ``rank`` is the largest module rank (what a slot must hold); ``alpha`` is the adapter-wide
    ``lora_alpha`` (a module may override it). ``num_layers`` is the base's layer count,
    ``num_experts`` 0 for a dense adapter. ``source`` records provenance (for a PEFT import the
    verbatim ``adapter_config.json``, the key prefix and, for expert modules, ``expert_modules``:
    where each one's keys were, see :mod:`catalog.pack.peft_experts`). Modules are kept sorted
    by name.

    Raises:
        InvalidPack: a field is out of range, modules repeat or contradict the totals.
    """

    base_id: str
    rank: int
    alpha: float
    dtype: str
    use_rslora: bool
    num_layers: int
    num_experts: int
    modules: tuple[ModuleSpec, ...]
    source: dict[str, Any] = field(hash=False)
    format_version: int = PACK_FORMAT_VERSION

    def __post_init__(self) -> None:
        if (
            self.format_version not in READABLE_FORMAT_VERSIONS
            or not isinstance(self.format_version, int)
            or isinstance(self.format_version, bool)
        ):
            _fail(
                f"unsupported pack format version {self.format_version!r} "
                f"(this reader knows {', '.join(map(str, READABLE_FORMAT_VERSIONS))})"
            )
        if (
            not isinstance(self.base_id, str)
            or not 1 <= len(self.base_id) <= MAX_BASE_ID_LENGTH
            or not self.base_id.isprintable()
        ):
            _fail(f"base_id must be a non-empty printable string, got {self.base_id!r}")
        if self.dtype not in PACK_DTYPES:
            _fail(f"dtype must be one of {', '.join(PACK_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.use_rslora, bool):
            _fail(f"use_rslora must be a boolean, got {self.use_rslora!r}")
        _check_int("rank", self.rank, 1, MAX_RANK)
        _check_int("num_layers", self.num_layers, 1, MAX_LAYERS)
        _check_int("num_experts", self.num_experts, 0, MAX_EXPERTS)
        object.__setattr__(self, "alpha", _check_alpha("alpha", self.alpha))
        modules = self.modules
        if not isinstance(modules, tuple | list) or not 1 <= len(modules) <= MAX_MODULES:
            _fail(f"modules must be a non-empty list of at most {MAX_MODULES} entries")
        if not all(isinstance(m, ModuleSpec) for m in modules):
            _fail("modules must be ModuleSpec entries")
        modules = tuple(sorted(modules, key=lambda m: m.name))
        for a, b in itertools.pairwise(modules):
            if a.name == b.name:
                _fail(f"module {a.name!r} is listed twice")
        for m in modules:
            if m.layers[-1] >= self.num_layers:
                _fail(
                    f"module {m.name!r} names layer {m.layers[-1]} "
                    f"but the base has {self.num_layers} layers"
                )
            if m.num_experts not in (0, self.num_experts):
                _fail(
                    f"module {m.name!r} has {m.num_experts} experts "
                    f"but the pack has {self.num_experts}"
                )
        max_rank = max(m.rank for m in modules)
        if self.rank != max_rank:
            _fail(f"rank {self.rank} is not the largest module rank {max_rank}")
        if self.num_experts and not any(m.num_experts for m in modules):
            _fail(f"num_experts is {self.num_experts} but no module has experts")
        object.__setattr__(self, "modules", modules)
        if not isinstance(self.source, dict):
            _fail("source must be a JSON object")
        try:
            # A deep copy through JSON: the manifest owns its provenance and it must serialize.
            source = json.loads(json.dumps(self.source, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidPack(f"source is not serializable as JSON: {exc}") from None
        object.__setattr__(self, "source", source)

    @property
    def lora_b_rank_major(self) -> bool:
        """Whether ``lora_B`` is stored rank-major (format 2) rather than as PEFT has it."""
        return self.format_version >= 2

    def stored_shape_b(self, module: ModuleSpec) -> tuple[int, ...]:
        """The shape ``module``'s stacked ``lora_B`` is stored in, by the format version."""
        return module.shape_bt if self.lora_b_rank_major else module.shape_b

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Module names, sorted."""
        return tuple(m.name for m in self.modules)

    def module(self, name: str) -> ModuleSpec:
        """Raises: KeyError when the pack does not adapt ``name``."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"pack has no module {name!r}")

    def scaling(self, name: str) -> float:
        """The factor PEFT applies to ``B @ A`` of module ``name``: alpha/r, or alpha/sqrt(r)
        with rsLoRA.

        Raises:
            KeyError: the pack does not adapt ``name``.
        """
        m = self.module(name)
        return m.alpha / (math.sqrt(m.rank) if self.use_rslora else m.rank)

    def with_base_id(self, base_id: str) -> PackManifest:
        """The same manifest for another base id. Raises: InvalidPack on a bad id."""
        return replace(self, base_id=base_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "base_id": self.base_id,
            "rank": self.rank,
            "alpha": self.alpha,
            "dtype": self.dtype,
            "use_rslora": self.use_rslora,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "modules": [m.to_json() for m in self.modules],
            "source": copy.deepcopy(self.source),
        }

    def to_json_text(self) -> str:
        """Canonical JSON (sorted keys, compact), as stored in a pack header."""
        return json.dumps(
            self.to_json(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, d: object) -> PackManifest:
        """Build from :meth:`to_json` output.

        Raises:
            InvalidPack: a missing, extra or ill-typed field, or an inconsistent manifest.
        """
        if not isinstance(d, dict):
            _fail("manifest is not a JSON object")
        _check_keys("manifest", d, _MANIFEST_KEYS, optional=set())
        modules = d["modules"]
        if not isinstance(modules, list) or len(modules) > MAX_MODULES:
            _fail(f"manifest modules must be a list of at most {MAX_MODULES} entries")
        return cls(
            base_id=d["base_id"],
            rank=d["rank"],
            alpha=d["alpha"],
            dtype=d["dtype"],
            use_rslora=d["use_rslora"],
            num_layers=d["num_layers"],
            num_experts=d["num_experts"],
            modules=tuple(ModuleSpec.from_json(m) for m in modules),
            source=d["source"],
            format_version=d["format_version"],
        )
