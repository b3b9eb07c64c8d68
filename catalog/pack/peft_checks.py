"""The checks PEFT import makes on an adapter's config and on each module's LoRA pairs.

A PEFT config may ask for features a pack cannot carry (DoRA, biases, ``modules_to_save``, ...):
:func:`check_config` refuses them by name. ``rank_pattern`` / ``alpha_pattern`` give each key its
own rank and alpha, looked up as PEFT does (:class:`PeftPatterns`); a pack holds one rank, alpha
and shape per module, which :class:`ModuleChecker` checks pair by pair, and one dtype per pack
(:func:`common_dtype`). Every refusal is an ``InvalidPack`` naming the field, key or module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NoReturn

from catalog.errors import InvalidPack
from catalog.pack.container import TensorBytes
from catalog.pack.manifest import MAX_EXPERTS, PACK_DTYPES
from catalog.pack.peft_files import PEFT_CONFIG_FILE

_MAX_PATTERN_LENGTH = 1024

#: Config features whose weights or semantics a pack cannot carry: refused when truthy.
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases)",
    "layer_replication": "layer_replication",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}


def _fail(message: str) -> NoReturn:
    raise InvalidPack(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_config(config: Mapping[str, Any]) -> None:
    """Raises: InvalidPack naming the first config field a pack cannot carry or that is
    malformed (``peft_type``, an unsupported feature, ``r``, ``lora_alpha``, ``use_rslora``)."""
    if config.get("peft_type") != "LORA":
        _fail(f"{PEFT_CONFIG_FILE}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            _fail(f"{PEFT_CONFIG_FILE}: {feature} is not supported by the pack format")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        _fail(f"{PEFT_CONFIG_FILE}: r must be a positive integer, got {r!r}")
    if not _is_number(config.get("lora_alpha")):
        _fail(f"{PEFT_CONFIG_FILE}: lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        _fail(f"{PEFT_CONFIG_FILE}: use_rslora must be a boolean")


def check_num_experts(num_experts: int | None) -> None:
    """Raises: InvalidPack when ``num_experts`` is given and not an integer in range."""
    if num_experts is not None and (
        not _is_int(num_experts) or not 1 <= num_experts <= MAX_EXPERTS
    ):
        _fail(f"num_experts must be an integer in [1, {MAX_EXPERTS}], got {num_experts!r}")


def common_dtype(tensors: Mapping[str, TensorBytes]) -> str:
    """The one dtype of ``tensors`` (non-empty).

    Raises:
        InvalidPack: mixed dtypes, or a dtype a pack cannot hold.
    """
    first_key, first = next(iter(tensors.items()))
    for key, tensor in tensors.items():
        if tensor.dtype != first.dtype:
            _fail(f"mixed dtypes: {key!r} is {tensor.dtype} but {first_key!r} is {first.dtype}")
    if first.dtype not in PACK_DTYPES:
        _fail(f"dtype {first.dtype} of {first_key!r} is not one of {', '.join(PACK_DTYPES)}")
    return first.dtype


class PeftPatterns:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup, as ``peft.utils.get_pattern_key``
    does it: the first pattern P (in file order) with ``re.match(rf"(.*\\.)?({P})$", key)``.

    Made from a config :func:`check_config` passed.

    Raises:
        InvalidPack: a pattern table that is not an object, a pattern that is too long or not a
            regex, or a value that is not a rank (integer) / alpha (number).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.r: int = config["r"]
        self.alpha: float = float(config["lora_alpha"])
        self.ranks = self._compile(config, "rank_pattern", _is_int)
        self.alphas = self._compile(config, "alpha_pattern", _is_number)
        #: No patterns: every key's rank is ``r`` and its alpha ``lora_alpha``.
        self.uniform = not self.ranks and not self.alphas

    @staticmethod
    def _compile(
        config: Mapping[str, Any], field: str, valid: Any
    ) -> list[tuple[re.Pattern[str], Any]]:
        table = config.get(field) or {}
        if not isinstance(table, dict):
            _fail(f"{PEFT_CONFIG_FILE}: {field} must be a JSON object")
        compiled = []
        for pattern, value in table.items():
            if len(pattern) > _MAX_PATTERN_LENGTH or not valid(value):
                _fail(f"{PEFT_CONFIG_FILE}: {field} entry {pattern!r}: {value!r} is invalid")
            try:
                compiled.append((re.compile(rf"(.*\.)?({pattern})$"), value))
            except re.error as exc:
                raise InvalidPack(
                    f"{PEFT_CONFIG_FILE}: {field} pattern {pattern!r} is not a regex: {exc}"
                ) from None
        return compiled

    @staticmethod
    def _lookup(table: list[tuple[re.Pattern[str], Any]], key: str, default: Any) -> Any:
        for regex, value in table:
            if regex.match(key):
                return value
        return default

    def rank(self, key: str) -> int:
        """The rank of ``key`` (a module path such as ``model.layers.3.self_attn.q_proj``)."""
        return int(self._lookup(self.ranks, key, self.r))

    def alpha_of(self, key: str) -> float:
        """The ``lora_alpha`` of ``key``."""
        return float(self._lookup(self.alphas, key, self.alpha))


class ModuleChecker:
    """Checks that every LoRA pair of one module agrees on shapes, rank and alpha."""

    def __init__(self, name: str, patterns: PeftPatterns) -> None:
        self.name = name
        self.patterns = patterns
        self.first: tuple[str, tuple[int, ...], tuple[int, ...], float] | None = None

    def check(
        self,
        where: str,
        pattern_key: str,
        shape_a: tuple[int, ...],
        shape_b: tuple[int, ...],
        rank: int,
    ) -> float:
        """Check one pair (``where`` names it in messages, ``pattern_key`` is its module path
        for the config's patterns, ``rank`` what its tensors show); returns its alpha.

        Raises:
            InvalidPack: its shapes or alpha differ from the module's first pair, or its rank
                from the config's.
        """
        expected_rank = self.patterns.rank(pattern_key)
        alpha = self.patterns.alpha_of(pattern_key)
        if self.first is None:
            self.first = (where, shape_a, shape_b, alpha)
        first_where, first_a, first_b, first_alpha = self.first
        if shape_a != first_a or shape_b != first_b:
            _fail(
                f"module {self.name!r} {where}: lora_A {list(shape_a)} / lora_B {list(shape_b)} "
                f"differ from {first_where}'s {list(first_a)} / {list(first_b)}; "
                f"a pack holds one rank and shape per module"
            )
        if expected_rank != rank:
            _fail(
                f"module {self.name!r} {where}: tensors have rank {rank} but "
                f"{PEFT_CONFIG_FILE} says {expected_rank}"
            )
        if alpha != first_alpha:
            _fail(
                f"module {self.name!r} {where}: lora_alpha {alpha} differs from "
                f"{first_where}'s {first_alpha}; a pack holds one alpha per module"
            )
        return alpha
