"""LoRA adapters for SD 1.x/2.x/XL: read (kohya / A1111, diffusers / PEFT) and merge on the host."""

from ldm_jax.checkpoints.lora.merge import merged_kernels, replace_leaves
from ldm_jax.checkpoints.lora.read import LoRA, LoRALayer, read_lora
from ldm_jax.checkpoints.lora.targets import LoRATarget, lora_targets

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRATarget",
    "lora_targets",
    "merged_kernels",
    "read_lora",
    "replace_leaves",
]
