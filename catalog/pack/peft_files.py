"""The names of the PEFT adapter directory layout, shared by PEFT import and export.

PEFT saves ``adapter_config.json`` and ``adapter_model.safetensors`` with one tensor per layer and
module (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``). A pack imported from
one records where it came from in its manifest ``source`` (kind ``peft``: the config, the key
prefix and the safetensors ``__metadata__``), which is what lets export write the same files back.
"""

from __future__ import annotations

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: ``source["kind"]`` of a pack imported from a PEFT directory.
SOURCE_KIND_PEFT = "peft"
#: Key prefix of the decoder layers in a PEFT causal-LM adapter (Llama, Qwen2, Mistral, ...).
DEFAULT_KEY_PREFIX = "base_model.model.model.layers"
#: What PEFT puts in front of the base model's own module names.
PEFT_MODEL_PREFIX = "base_model.model."
#: The ``__metadata__`` PEFT (through the ``safetensors`` library) writes into its weights file.
PEFT_SAFETENSORS_METADATA = {"format": "pt"}
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
