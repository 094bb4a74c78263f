"""LoRA adapters for SD 1.x/2.x/XL: read and write (kohya / A1111, diffusers / PEFT), merge on
the host."""

from ldm_jax.checkpoints.lora.merge import merged_kernels, replace_leaves
from ldm_jax.checkpoints.lora.read import LoRA, LoRALayer, read_lora
from ldm_jax.checkpoints.lora.targets import LoRATarget, lora_targets
from ldm_jax.checkpoints.lora.write import lora_state_dict, save_lora

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRATarget",
    "lora_state_dict",
    "lora_targets",
    "merged_kernels",
    "read_lora",
    "replace_leaves",
    "save_lora",
]
