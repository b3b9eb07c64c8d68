"""Real models and real PEFT adapters for tests, built from small configs (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def tiny_llama_config(**overrides: object):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    params: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_qwen2_config(**overrides: object):  # type: ignore[no-untyped-def]
    from transformers import Qwen2Config

    params: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return Qwen2Config(**params)


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def make_peft_adapter(
    base_model,  # type: ignore[no-untyped-def]
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 1,
    dtype: torch.dtype | None = None,
    **lora_kwargs: object,
) -> Path:
    """Save a real PEFT LoRA adapter for ``base_model`` with non-zero ``lora_B``.

    PEFT initialises ``lora_B`` to zero, which would make every adapter a no-op and hide errors,
    so both matrices are filled with seeded random values before saving.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        **lora_kwargs,  # type: ignore[arg-type]
    )
    model = get_peft_model(copy.deepcopy(base_model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    if dtype is not None:
        model = model.to(dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    return out_dir
