"""Real models and real PEFT adapters for tests, built from small configs (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _tiny_config(config_class, overrides: dict[str, object], **shape: object):  # type: ignore[no-untyped-def]
    """``config_class`` with the small shapes every test model shares, then ``shape``, then
    the caller's ``overrides``."""
    params: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    params.update(shape)
    params.update(overrides)
    return config_class(**params)


def tiny_llama_config(**overrides: object):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return _tiny_config(LlamaConfig, overrides, intermediate_size=128)


def tiny_qwen2_config(**overrides: object):  # type: ignore[no-untyped-def]
    from transformers import Qwen2Config

    return _tiny_config(Qwen2Config, overrides, intermediate_size=96)


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


# ---------------------------------------------------------------- MoE


def tiny_mixtral_config(**overrides: object):  # type: ignore[no-untyped-def]
    """A transformers 5 Mixtral: fused experts ``mlp.experts.gate_up_proj [E, 2I, H]`` and
    ``mlp.experts.down_proj [E, H, I]``. Hidden 64 and intermediate 96 keep every projection's
    shape distinct, so a mapping that swaps them cannot pass by accident."""
    from transformers import MixtralConfig

    return _tiny_config(
        MixtralConfig, overrides, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2
    )


def tiny_qwen2_moe_config(**overrides: object):  # type: ignore[no-untyped-def]
    """A transformers 5 Qwen2-MoE: fused experts plus a dense ``mlp.shared_expert``."""
    from transformers import Qwen2MoeConfig

    return _tiny_config(
        Qwen2MoeConfig,
        overrides,
        intermediate_size=96,
        moe_intermediate_size=40,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
    )


def tiny_qwen3_moe_config(**overrides: object):  # type: ignore[no-untyped-def]
    """A transformers 5 Qwen3-MoE: fused experts, no shared expert."""
    from transformers import Qwen3MoeConfig

    return _tiny_config(
        Qwen3MoeConfig,
        overrides,
        intermediate_size=96,
        moe_intermediate_size=40,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
    )


#: What PEFT's ``target_parameters`` names on a transformers 5 fused-experts model.
FUSED_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def make_peft_moe_adapter(
    base_model,  # type: ignore[no-untyped-def]
    out_dir: Path,
    *,
    target_parameters: Sequence[str] = FUSED_EXPERT_PARAMETERS,
    target_modules: Sequence[str] = (),
    **kwargs: object,
) -> Path:
    """A real PEFT adapter on a fused-experts MoE model via ``LoraConfig(target_parameters=...)``
    (PEFT 0.21 saves ``...mlp.experts.lora_A.weight`` ``(E*r, in)`` and ``lora_B``
    ``(out, E*r)``, one ``base_layer`` level deeper per parameter wrapped before), with non-zero
    random LoRA weights. Other keyword arguments are :func:`make_peft_adapter`'s."""
    return make_peft_adapter(
        base_model,
        out_dir,
        target_modules=target_modules,
        target_parameters=list(target_parameters),
        **kwargs,
    )


#: Per-expert projection names: (gate, up, down).
PER_EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),  # transformers 4 Mixtral, block_sparse_moe.experts.{e}.w1
    "qwen": ("gate_proj", "up_proj", "down_proj"),  # transformers 4 Qwen2-MoE / OLMoE, vLLM
}


class PerExpertMLP(torch.nn.Module):
    """One expert as three ``nn.Linear`` layers, named as in older checkpoints."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, torch.nn.Linear(hidden, inter, bias=False))
        self.add_module(up, torch.nn.Linear(hidden, inter, bias=False))
        self.add_module(down, torch.nn.Linear(inter, hidden, bias=False))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class PerExpertExperts(torch.nn.ModuleList):
    """Experts as a list of :class:`PerExpertMLP` that computes exactly what transformers 5's
    fused experts module compute (same call signature), so PEFT can target each expert's
    linear layers the way it did on transformers 4 models."""

    def __init__(self, fused, names: tuple[str, str, str]) -> None:  # type: ignore[no-untyped-def]
        num_experts, two_inter, hidden = fused.gate_up_proj.shape
        inter = two_inter // 2
        super().__init__(
            PerExpertMLP(names, hidden, inter, fused.act_fn) for _ in range(num_experts)
        )
        gate, up, down = names
        with torch.no_grad():
            for e, expert in enumerate(self):
                # transformers 5 chunks gate_up_proj's output as (gate, up): rows [:I], [I:].
                getattr(expert, gate).weight.copy_(fused.gate_up_proj[e, :inter])
                getattr(expert, up).weight.copy_(fused.gate_up_proj[e, inter:])
                getattr(expert, down).weight.copy_(fused.down_proj[e])

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def per_expert_moe_model(model, naming: str = "qwen"):  # type: ignore[no-untyped-def]
    """A copy of a fused-experts transformers 5 MoE model whose experts are per-expert
    ``nn.Linear`` layers (same weights, same outputs), named as older checkpoints name them:
    ``mlp.experts.{e}.gate_proj`` (``naming="qwen"``) or ``block_sparse_moe.experts.{e}.w1``
    (``naming="mixtral"``). PEFT adapters on it have the per-expert key layout."""
    import copy

    model = copy.deepcopy(model)
    for layer in model.model.layers:
        moe = layer.mlp
        moe.experts = PerExpertExperts(moe.experts, PER_EXPERT_NAMES[naming])
        if naming == "mixtral":
            # transformers 4 registered the sparse block as `block_sparse_moe`; the transformers
            # 5 decoder layer calls `self.mlp`, so keep that as a plain (unregistered) attribute.
            del layer.mlp
            layer.block_sparse_moe = moe
            object.__setattr__(layer, "mlp", moe)
    return model


#: Per-expert projection -> (fused transformers 5 parameter, which half of gate_up_proj's rows).
PER_EXPERT_PROJECTIONS: dict[str, tuple[str, int | None]] = {
    "w1": ("gate_up_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", None),
    "down_proj": ("down_proj", None),
    "gate_up_proj": ("gate_up_proj", None),
}


def stacked_tensors(pack_bytes: bytes) -> dict[str, torch.Tensor]:
    """A pack's stacked tensors read with the ``safetensors`` library (not this project's
    reader), every ``lora_B`` in PEFT's orientation ``[L, (E,) out, r]``: a format-2 pack stores
    it rank-major (``[L, (E,) r, out]``, see ``catalog.pack.format``), so it is transposed."""
    from safetensors.torch import load

    from catalog.pack import read_pack

    rank_major = read_pack(pack_bytes).manifest.lora_b_rank_major
    return {
        name: t.transpose(-1, -2) if rank_major and name.endswith(".lora_B") else t
        for name, t in load(pack_bytes).items()
    }


def merged_moe_reference(model, pack_bytes: bytes):  # type: ignore[no-untyped-def]
    """A copy of a fused-experts transformers 5 MoE model (experts stored ``[E, out, in]``, as
    Mixtral and Qwen-MoE store them) with every module of a pack merged into its weights:
    ``W += scaling * B @ A``, per expert for expert modules. Per-expert projections land on
    their rows of the fused parameter (``w1``/``gate_proj`` on ``gate_up_proj[:, :I]``,
    ``w3``/``up_proj`` on ``gate_up_proj[:, I:]``, ``w2`` on ``down_proj``). This is the explicit
    per-expert merged-weight reference for MoE adapters."""
    import copy

    from catalog.pack import read_pack

    manifest = read_pack(pack_bytes).manifest
    stacked = stacked_tensors(pack_bytes)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for spec in manifest.modules:
            a = stacked[f"layers.{spec.name}.lora_A"].float()
            b = stacked[f"layers.{spec.name}.lora_B"].float()
            scaling = manifest.scaling(spec.name)
            for i, layer in enumerate(spec.layers):
                block = model.model.layers[layer]
                if not spec.num_experts:
                    weight = block.get_submodule(spec.name).weight
                    weight += (scaling * b[i] @ a[i]).to(weight.dtype)
                    continue
                parameter, half = PER_EXPERT_PROJECTIONS[spec.name.rpartition(".")[2]]
                weight = getattr(block.mlp.experts, parameter)
                delta = scaling * torch.einsum("eor,eri->eoi", b[i], a[i])
                if half is not None:
                    rows = weight.shape[1] // 2
                    weight = weight[:, half * rows : (half + 1) * rows]
                weight += delta.to(weight.dtype)
    return model
