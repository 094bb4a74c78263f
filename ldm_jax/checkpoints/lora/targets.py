"""Which layer each LoRA module name adapts: exact tables built from the checkpoint key tables.

A LoRA file names the module it adapts, in one of two spellings of the same module paths:

- kohya / A1111: ``lora_unet_<diffusers UNet module path>`` and ``lora_te_<transformers
  CLIPTextModel module path>`` with every "." written "_" (``lora_te_text_model_encoder_layers_0
  _self_attn_q_proj``); SDXL's encoders are ``lora_te1_`` and ``lora_te2_`` (a refiner: te2);
- diffusers / PEFT: ``unet.<module path>``, ``text_encoder.<module path>`` (with or without
  the ``text_model.`` level that transformers >= 5.6 dropped) and SDXL's ``text_encoder_2.``.

kohya's SGM-based trainers (and LyCORIS) also write the UNet's CompVis module paths
(``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``, ``..._in_layers_2``); those are
accepted too. The module paths are those of the diffusers and CompVis UNet tables
(checkpoints/diffusers/unet.py, checkpoints/compvis/unet.py) and the transformers CLIP table
(checkpoints/transformers_clip.py): every ``<module>.weight`` entry whose parameter is a
``kernel`` (linear layers and convolutions) is a target, with the table's own transform from the
torch layout to ours. Nothing is guessed from suffixes or shapes.
"""

import dataclasses

from ldm_jax.checkpoints.compvis.unet import compvis_unet_table
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_table
from ldm_jax.checkpoints.errors import UnsupportedLoRAError
from ldm_jax.checkpoints.key_table import KeyMap, KeyTable, Transform
from ldm_jax.checkpoints.transformers_clip import TEXT_MODEL_PREFIX, clip_text_key_table
from ldm_jax.spec import ModelSpec

KOHYA_PREFIXES = {"unet": "lora_unet_"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # diffusers / PEFT prefixes
# What a prefix of a key that names no layer belongs to, for the error message.
OTHER_ARCHITECTURES = {
    "lora_te_": "an SD 1.x/2.x text encoder",
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
    component: str  # its diffusers pipeline component: unet, text_encoder, text_encoder_2


def _kernels(table: KeyTable, network: str, component: str) -> list[LoRATarget]:
    targets = []
    for entry in table.entries:
        if isinstance(entry, KeyMap) and entry.flax_path[-1] == "kernel":
            module = entry.torch_key.removesuffix(".weight")
            if module == entry.torch_key:
                raise ValueError(f"key table entry {entry.torch_key!r} maps a kernel, not .weight")
            targets.append(LoRATarget(network, entry.flax_path, entry.transform, module, component))
    return targets


def text_encoders(spec: ModelSpec) -> list[tuple[tuple[str, ...], str, str, object]]:
    """(flax path prefix in params["cond_stage"], kohya prefix, diffusers component, config) of
    each transformers CLIP text encoder of `spec`."""
    cond = spec.cond_stage
    if cond is None:
        return []
    if cond.kind in _TEXT_KINDS:
        return [((), "lora_te_", "text_encoder", cond.config)]
    if cond.kind == "sdxl":  # base: (CLIP-L, bigG) = te1, te2; refiner: (bigG,) = te2
        encoders = cond.config.text_encoders
        numbers = ("1", "2") if len(encoders) == 2 else ("2",)
        return [
            ((f"encoder_{i}",), f"lora_te{n}_", "text_encoder" + ("_2" if n == "2" else ""), c)
            for i, (n, c) in enumerate(zip(numbers, encoders, strict=True))
        ]
    return []  # LDM BERT, class embedders, ...: UNet LoRAs only


def lora_targets(spec: ModelSpec) -> dict[str, LoRATarget]:
    """Every accepted LoRA module name (both formats) -> the layer it adapts, for `spec`."""
    try:
        unet_table = diffusers_unet_table(spec.unet)
    except ValueError as error:
        raise UnsupportedLoRAError(f"LoRA needs a diffusers-expressible UNet: {error}") from None
    names: dict[str, LoRATarget] = {}
    for target in _kernels(compvis_unet_table(spec.unet), "unet", "unet"):  # kohya only
        _add(names, KOHYA_PREFIXES["unet"] + target.module.replace(".", "_"), target)
    for target in _kernels(unet_table, "unet", "unet"):
        _add(names, KOHYA_PREFIXES["unet"] + target.module.replace(".", "_"), target)
        _add(names, "unet." + target.module, target)
    for head, kohya, component, config in text_encoders(spec):
        table = clip_text_key_table(config, TEXT_MODEL_PREFIX)
        for target in _kernels(table, "cond_stage", component):
            target = dataclasses.replace(target, flax_path=head + target.flax_path)
            module = target.module
            _add(names, kohya + module.replace(".", "_"), target)
            _add(names, f"{component}.{module}", target)
            if module.startswith(TEXT_MODEL_PREFIX):  # transformers >= 5.6 module paths
                _add(names, f"{component}.{module.removeprefix(TEXT_MODEL_PREFIX)}", target)
    return names


def _add(names: dict[str, LoRATarget], name: str, target: LoRATarget) -> None:
    if name in names:  # "." -> "_" must not merge two modules
        raise ValueError(f"LoRA name {name!r} would name two layers")
    names[name] = target


def other_architecture(name: str) -> str | None:
    """What a module name belongs to when it is another architecture's (else None)."""
    for prefix, what in OTHER_ARCHITECTURES.items():
        if name.startswith(prefix):
            return what
    return None
