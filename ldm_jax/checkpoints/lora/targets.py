"""Which layer each LoRA module name adapts: exact tables built from the checkpoint key tables.

A LoRA file names the module it adapts, in one of two spellings of the same module paths:

- kohya / A1111: ``lora_unet_<diffusers UNet module path>`` and ``lora_te_<transformers
  CLIPTextModel module path>`` with every "." written "_" (``lora_te_text_model_encoder_layers_0
  _self_attn_q_proj``);
- diffusers / PEFT: ``unet.<module path>`` and ``text_encoder.<module path>`` (with or without
  the ``text_model.`` level that transformers >= 5.6 dropped).

The module paths are those of the diffusers UNet table (checkpoints/diffusers/unet.py) and the
transformers CLIP table (checkpoints/transformers_clip.py): every ``<module>.weight`` entry whose
parameter is a ``kernel`` (linear layers and convolutions) is a target, with the table's own
transform from the torch layout to ours. Nothing is guessed from suffixes or shapes.
"""

import dataclasses

from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_table
from ldm_jax.checkpoints.errors import UnsupportedLoRAError
from ldm_jax.checkpoints.key_table import KeyMap, KeyTable, Transform
from ldm_jax.checkpoints.transformers_clip import TEXT_MODEL_PREFIX, clip_text_key_table
from ldm_jax.spec import ModelSpec

# Our network names (the params' top-level keys) and the prefixes each format gives them.
KOHYA_PREFIXES = {"unet": "lora_unet_", "cond_stage": "lora_te_"}
DIFFUSERS_PREFIXES = {"unet": "unet.", "cond_stage": "text_encoder."}
# Prefixes of networks ldm_jax's SD 1.x/2.x models lack (SDXL's two text encoders).
OTHER_ARCHITECTURES = {
    "lora_te1_": "SDXL's first text encoder",
    "lora_te2_": "SDXL's second text encoder",
    "text_encoder_2.": "SDXL's second text encoder",
}
_TEXT_KINDS = ("clip", "openclip")  # cond stages that are transformers CLIPTextModels


@dataclasses.dataclass(frozen=True)
class LoRATarget:
    """One adaptable layer: its kernel in our params and the torch -> ours layout transform."""

    network: str  # "unet" or "cond_stage"
    flax_path: tuple[str, ...]  # the kernel's path inside params[network]
    transform: Transform
    module: str  # the diffusers / transformers module path


def _kernels(table: KeyTable, network: str) -> list[LoRATarget]:
    targets = []
    for entry in table.entries:
        if isinstance(entry, KeyMap) and entry.flax_path[-1] == "kernel":
            module = entry.torch_key.removesuffix(".weight")
            if module == entry.torch_key:
                raise ValueError(f"key table entry {entry.torch_key!r} maps a kernel, not .weight")
            targets.append(LoRATarget(network, entry.flax_path, entry.transform, module))
    return targets


def lora_targets(spec: ModelSpec) -> dict[str, LoRATarget]:
    """Every accepted LoRA module name (both formats) -> the layer it adapts, for `spec`."""
    if spec.cond_stage is not None and spec.cond_stage.kind == "sdxl":
        raise UnsupportedLoRAError("LoRA for SDXL models is not supported yet (SD 1.x/2.x only)")
    try:
        unet_table = diffusers_unet_table(spec.unet)
    except ValueError as error:
        raise UnsupportedLoRAError(f"LoRA needs a diffusers-expressible UNet: {error}") from None
    targets = _kernels(unet_table, "unet")
    if spec.cond_stage is not None and spec.cond_stage.kind in _TEXT_KINDS:
        text_table = clip_text_key_table(spec.cond_stage.config, TEXT_MODEL_PREFIX)
        targets += _kernels(text_table, "cond_stage")
    names: dict[str, LoRATarget] = {}
    for target in targets:
        module = target.module
        spellings = [
            KOHYA_PREFIXES[target.network] + module.replace(".", "_"),
            DIFFUSERS_PREFIXES[target.network] + module,
        ]
        if target.network == "cond_stage":  # transformers >= 5.6 module paths
            spellings.append(DIFFUSERS_PREFIXES["cond_stage"] + module[len(TEXT_MODEL_PREFIX) :])
        for name in spellings:
            if name in names:  # "." -> "_" must not merge two modules
                raise ValueError(f"LoRA name {name!r} would name two layers")
            names[name] = target
    return names


def other_architecture(name: str) -> str | None:
    """What a module name belongs to when it is another architecture's (else None)."""
    for prefix, what in OTHER_ARCHITECTURES.items():
        if name.startswith(prefix):
            return what
    return None
