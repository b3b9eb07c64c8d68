"""Shared checks of the PEFT import's refusals (dense and MoE tests alike): a state dict that a
pack cannot carry must be refused with exactly the expected message."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from catalog.errors import InvalidPack
from catalog.pack import TensorBytes, pack_from_peft_tensors
from catalog.pack.container import parse_safetensors

_PARTNER = {"lora_A": "lora_B", "lora_B": "lora_A"}


def peft_parts(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, TensorBytes]]:
    """The config and state dict of the PEFT adapter in ``adapter_dir``, as import reads them."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    data = (adapter_dir / "adapter_model.safetensors").read_bytes()
    return config, dict(parse_safetensors(data).tensors)


def refused_tensors(
    config: dict[str, Any], tensors: dict[str, TensorBytes], message: str, **kwargs: Any
) -> None:
    """Import of ``tensors`` under ``config`` raises InvalidPack whose text fully matches the
    regex ``message``."""
    with pytest.raises(InvalidPack) as info:
        pack_from_peft_tensors(config, tensors, "base", **kwargs)
    assert re.fullmatch(message, str(info.value)), str(info.value)


def refused_stray_key(
    config: dict[str, Any],
    tensors: dict[str, TensorBytes],
    key: str,
    problem: str,
    like: str,
) -> None:
    """``tensors`` with one more key, ``key`` (holding the tensor under ``like``), is refused
    naming that key and ``problem`` (a regex)."""
    refused_tensors(
        config,
        {**tensors, key: tensors[like]},
        rf"unsupported key '{re.escape(key)}': {problem}",
    )


def refused_unpaired(config: dict[str, Any], tensors: dict[str, TensorBytes], key: str) -> None:
    """``tensors`` without ``key`` (a lora_A or lora_B weight) is refused naming its partner,
    which now has no match."""
    assert key in tensors, key
    side = "lora_A" if ".lora_A." in key else "lora_B"
    partner = key.replace(f".{side}.", f".{_PARTNER[side]}.")
    assert partner in tensors, partner
    refused_tensors(
        config,
        {k: t for k, t in tensors.items() if k != key},
        rf"key {re.escape(partner)} has no matching {side}\.weight",
    )
