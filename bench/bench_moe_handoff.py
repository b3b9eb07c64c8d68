"""Handoff on a small MoE model: adapter-only attach vs a full merged reload, as MinT measures.

``bench_handoff``'s method (see its docstring: trainer and engine share only the durable tier;
full path = upload the merged safetensors checkpoint, download it, copy every tensor into the
resident model in place; adapter path = ``push_peft_dir`` (import + push in one call) + the engine's
``attach`` until usable), on a transformers 5 Mixtral-shaped MoE base instead of a dense one:
12 layers, hidden 1024, 16 experts of intermediate 512 (top-2), vocab 32000, bf16, ~0.4B
parameters (~0.1B active; random weights, nothing is downloaded). The adapters are what PEFT
saves for such a model: ``target_modules`` q/k/v/o plus ``target_parameters`` on the fused
experts (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``; keys and shapes taken from a
PEFT model built on the meta device), ranks 1, 16 and 64, random bf16 values, a new revision per
run. The merged checkpoint merges every expert's ``scaling * B_e @ A_e`` into the fused
parameters (timed, not counted). Settings: S3 (SeaweedFS started here) and colocated (local
file stores, warm page cache). Warm-up runs first, then ``--runs`` timed runs, medians.
MinT reports 2.85x for its 30B MoE; issue 3's floor (>= 25x at rank 16 over S3) is for the
dense model, and none is set for MoE.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_moe_handoff.py [--runs 5] [--small]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_handoff import (
    HANDOFF_COLUMNS,
    RANKS,
    handoff_rows,
    parse_handoff_args,
    run_settings,
    timed,
)
from bench.common import print_table, write_results

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def moe_config(small: bool = False) -> Any:
    from transformers import MixtralConfig

    if small:
        return MixtralConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        )
    return MixtralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=512,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def build_base(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def peft_layout(config: Any, rank: int) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """PEFT's own config and key shapes for this model and rank (built on the meta device)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        peft_config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(TARGET_MODULES),
            target_parameters=list(TARGET_PARAMETERS),
            lora_dropout=0.0,
        )
        peft_model = get_peft_model(model, peft_config)
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    return peft_model.peft_config["default"], shapes


def write_adapter(
    directory: Path, layout: tuple[Any, dict[str, tuple[int, ...]]], seed: int
) -> Path:
    """A PEFT adapter directory with PEFT's config and keys, random non-zero bf16 weights."""
    from safetensors.torch import save_file

    peft_config, shapes = layout
    directory.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(directory))
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        key: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        for key, shape in shapes.items()
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def merged_moe_state(base: Any, pack: bytes) -> dict[str, torch.Tensor]:
    """The trainer's merged checkpoint: every module of the pack merged into the base weights,
    per expert for the fused experts (``gate_up_proj[e] += s * B_e @ A_e``)."""
    from safetensors.torch import load

    from catalog.pack import read_pack

    manifest = read_pack(pack).manifest
    stacked = load(pack)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for spec in manifest.modules:
        a = stacked[f"layers.{spec.name}.lora_A"].float()
        b = stacked[f"layers.{spec.name}.lora_B"].float()
        scaling = manifest.scaling(spec.name)
        for i, layer in enumerate(spec.layers):
            prefix = f"model.layers.{layer}.{spec.name}"
            key = prefix if spec.num_experts else f"{prefix}.weight"
            delta = torch.einsum("...or,...ri->...oi", b[i], a[i]) * scaling
            state[key] += delta.to(state[key].dtype)
    return state


def main() -> None:
    args = parse_handoff_args(__doc__.split("\n")[0])

    from safetensors.torch import save

    from bench.bench_mixed_batch import BASE_ID
    from catalog.pack import import_peft_dir

    config = moe_config(args.small)
    print(
        f"building the MoE base ({config.num_hidden_layers} layers, "
        f"{config.num_local_experts} experts, bf16) ...",
        flush=True,
    )
    base = build_base(config)
    parameters = sum(p.numel() for p in base.parameters())
    root = Path(tempfile.mkdtemp(prefix="bench-moe-handoff-"))
    print("writing the trainer's adapters ...", flush=True)
    adapter_dirs = {}
    for rank in RANKS:
        layout = peft_layout(config, rank)
        adapter_dirs[rank] = [
            write_adapter(root / "trainer" / f"r{rank}-{run}", layout, seed=rank * 1000 + run)
            for run in range(args.warmup + args.runs)
        ]
    first_pack = import_peft_dir(adapter_dirs[16][0], base_id=BASE_ID)
    merge_s, state = timed(lambda: merged_moe_state(base, first_pack))
    exports = [timed(lambda s=state: save(s))[0] for _ in range(args.warmup + args.runs)]
    export_full_s = statistics.median(exports[args.warmup :])
    checkpoint = save(state)
    del state
    print(
        f"{parameters / 1e6:.0f}M parameters; checkpoint {len(checkpoint) / 2**20:.0f} MiB: "
        f"merge {merge_s:.2f}s (not counted), serialize {export_full_s:.2f}s",
        flush=True,
    )

    settings = run_settings(
        args.settings,
        "moe-handoff",
        base,
        checkpoint,
        adapter_dirs,
        root,
        args.warmup,
        export_full_s,
    )
    table = handoff_rows(settings)
    print_table(
        f"MoE handoff: trainer has a revision -> engine serves it ({config.num_hidden_layers} "
        f"layers, {config.num_local_experts} experts, {parameters / 1e6:.0f}M parameters, bf16, "
        f"medians of {args.runs})",
        HANDOFF_COLUMNS,
        table,
    )
    write_results(
        f"moe_handoff{'_small' if args.small else ''}",
        {
            "config": {
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "experts": config.num_local_experts,
                "expert_intermediate": config.intermediate_size,
                "parameters": parameters,
                "dtype": "bf16",
                "target_modules": list(TARGET_MODULES),
                "target_parameters": list(TARGET_PARAMETERS),
                "runs": args.runs,
                "warmup": args.warmup,
                "merge_s_not_counted": merge_s,
                "checkpoint_bytes": len(checkpoint),
            },
            "settings": settings,
        },
    )


if __name__ == "__main__":
    main()
