"""Import from, and export to, the PEFT adapter directory layout: the public face.

PEFT saves ``adapter_config.json`` and ``adapter_model.safetensors`` with one tensor per layer and
module (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``). Import stacks them
per module into a pack; export slices them back out under the original key names, so a round trip
is bit-exact. MoE expert LoRA comes in two PEFT layouts (one pair per expert, or PEFT's
``target_parameters`` on fused 3-D experts), both stacked to ``[L, E, r, in]`` /
``[L, E, r, out]`` (``lora_B`` rank-major, see :mod:`catalog.pack.format`) and written back
where they came from (see :mod:`catalog.pack.peft_experts`). Whatever import does not
understand (DoRA, embedding LoRA, biases, ``modules_to_save``, keys outside the decoder layers,
mixed dtypes, a missing expert) is refused by name: a pack never silently drops a weight.

The work lives in modules with one job each:

- :mod:`catalog.pack.peft_files`: the layout's file names, key prefix and suffixes;
- :mod:`catalog.pack.peft_checks`: config checks, ``rank_pattern``/``alpha_pattern`` lookup,
  the per-module shape/rank/alpha checks, the common dtype;
- :mod:`catalog.pack.peft_keys`: grouping a state dict's keys into pack modules;
- :mod:`catalog.pack.peft_stacking`: stacking one module (dense, per-expert, fused experts);
- :mod:`catalog.pack.peft_import`: the import entry points and the plan they build;
- :mod:`catalog.pack.peft_export`: export, with recorded or synthesized config and layouts;
- :mod:`catalog.pack.atomic_write`: the temporary-name-and-rename write export uses.
"""

from __future__ import annotations

from catalog.pack.atomic_write import write_atomically
from catalog.pack.peft_export import export_peft_dir, synthesize_peft_config
from catalog.pack.peft_files import (
    DEFAULT_KEY_PREFIX,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    SOURCE_KIND_PEFT,
)
from catalog.pack.peft_import import (
    MAX_CONFIG_BYTES,
    import_peft_dir,
    pack_from_peft_tensors,
    plan_from_peft_tensors,
    plan_peft_dir,
)

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "MAX_CONFIG_BYTES",
    "PEFT_CONFIG_FILE",
    "PEFT_WEIGHTS_FILE",
    "SOURCE_KIND_PEFT",
    "export_peft_dir",
    "import_peft_dir",
    "pack_from_peft_tensors",
    "plan_from_peft_tensors",
    "plan_peft_dir",
    "synthesize_peft_config",
    "write_atomically",
]
