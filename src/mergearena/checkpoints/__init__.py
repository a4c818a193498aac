"""Read and write Hugging Face checkpoints and PEFT LoRA adapters, one tensor at a time.

- ``Checkpoint.open(dir)``: lazy safetensors (single or sharded) or safe ``.bin`` reading.
- ``LoraAdapter.open(dir)``: a PEFT LoRA adapter's factors and per-tensor deltas.
- ``routed.read_manifest(dir)``: a routed model's directory (``routed.json``) and its parameters.
- ``StreamingShardWriter`` / ``atomic_directory`` / ``copy_support_files``: write merged models.
- ``resolve_model_ref("path" | "zoo:NAME" | "org/name[@rev]")``: find a model locally.
"""

from mergearena.checkpoints.lora import (
    LoraAdapter,
    LoraModule,
    get_pattern_key,
    is_adapter_dir,
    write_adapter,
)
from mergearena.checkpoints.reader import (
    Checkpoint,
    TensorInfo,
    load_torch_bin,
    read_safetensors_header,
)
from mergearena.checkpoints.refs import (
    mergearena_cache_dir,
    model_ref_exists,
    resolve_model_ref,
    zoo_model_dir,
)
from mergearena.checkpoints.writer import (
    StreamingShardWriter,
    atomic_directory,
    copy_support_files,
)

__all__ = [
    "Checkpoint",
    "LoraAdapter",
    "LoraModule",
    "StreamingShardWriter",
    "TensorInfo",
    "atomic_directory",
    "copy_support_files",
    "get_pattern_key",
    "is_adapter_dir",
    "load_torch_bin",
    "mergearena_cache_dir",
    "model_ref_exists",
    "read_safetensors_header",
    "resolve_model_ref",
    "write_adapter",
    "zoo_model_dir",
]
