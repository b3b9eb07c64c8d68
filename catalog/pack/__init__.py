"""The pack format: one safetensors file per adapter revision, LoRA tensors stacked per module.

``read_pack`` validates and views a pack without copying; ``write_pack`` builds one;
``import_peft_dir`` / ``export_peft_dir`` convert from and to the PEFT adapter directory layout
(``plan_peft_dir`` lays an import out so that it can be written straight into a caller's
buffer, such as a file's mapping).
Nothing here imports torch: stacking and splitting are byte concatenation and slicing (and
one transposition of ``lora_B`` per layer between PEFT's orientation and the pack's rank-major
one, see ``catalog.pack.format``; ``convert_pack`` moves a pack between format versions).
"""

from catalog.pack.container import DTYPE_ITEMSIZE, TensorBytes
from catalog.pack.format import (
    MAX_PACK_HEADER_BYTES,
    Pack,
    PackPlan,
    ParsedHeaders,
    convert_pack,
    expected_tensors,
    lora_a_name,
    lora_b_name,
    pack_header_nbytes,
    read_pack,
    read_pack_header,
    write_pack,
)
from catalog.pack.manifest import (
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_RANK,
    PACK_DTYPES,
    PACK_FORMAT,
    PACK_FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    ModuleSpec,
    PackManifest,
)
from catalog.pack.peft import (
    DEFAULT_KEY_PREFIX,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    SOURCE_KIND_PEFT,
    export_peft_dir,
    import_peft_dir,
    pack_from_peft_tensors,
    plan_from_peft_tensors,
    plan_peft_dir,
    synthesize_peft_config,
)
from catalog.pack.peft_experts import (
    LAYOUT_PEFT_PARAMETER,
    LAYOUT_PER_EXPERT,
    ExpertLayout,
)

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DTYPE_ITEMSIZE",
    "LAYOUT_PEFT_PARAMETER",
    "LAYOUT_PER_EXPERT",
    "MAX_EXPERTS",
    "MAX_LAYERS",
    "MAX_PACK_HEADER_BYTES",
    "MAX_RANK",
    "PACK_DTYPES",
    "PACK_FORMAT",
    "PACK_FORMAT_VERSION",
    "PEFT_CONFIG_FILE",
    "PEFT_WEIGHTS_FILE",
    "READABLE_FORMAT_VERSIONS",
    "SOURCE_KIND_PEFT",
    "ExpertLayout",
    "ModuleSpec",
    "Pack",
    "PackManifest",
    "PackPlan",
    "ParsedHeaders",
    "TensorBytes",
    "convert_pack",
    "expected_tensors",
    "export_peft_dir",
    "import_peft_dir",
    "lora_a_name",
    "lora_b_name",
    "pack_from_peft_tensors",
    "pack_header_nbytes",
    "plan_from_peft_tensors",
    "plan_peft_dir",
    "read_pack",
    "read_pack_header",
    "synthesize_peft_config",
    "write_pack",
]
