"""Random LoRA files for a tiny diffusers StableDiffusionPipeline, in the kohya / A1111 and the
diffusers / PEFT formats (written here from the torch modules, independently of ldm_jax)."""

import json

import diffusers
import numpy as np
import safetensors.torch
import torch
from references.torch_reference import randomize_

from support.tiny_pipelines import sd_components

# What LoRA trainers adapt: attention projections, feed-forward, transformer proj_in/out, and the
# "LoCon" convolutions of the res blocks and resamplers (3x3 and 1x1).
UNET_MODULES = (
    ".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out",
    ".conv1", ".conv2", ".conv_shortcut", ".time_emb_proj", "samplers.0.conv",
)  # fmt: skip
TEXT_MODULES = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def lora_modules(pipe) -> dict[str, list[str]]:
    """{"unet": [...], "text_encoder": [...]} module paths of the layers to adapt."""

    def pick(model, suffixes):
        return [
            name
            for name, module in model.named_modules()
            if name.endswith(suffixes) and isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
        ]

    modules = {"unet": pick(pipe.unet, UNET_MODULES)}
    for name, model in _text_encoders(pipe).items():
        modules[name] = pick(model, TEXT_MODULES)
    return modules


def _text_encoders(pipe) -> dict:
    names = ("text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def random_factors(pipe, seed: int, ranks=(2, 3), alpha=None, std: float = 0.2) -> dict:
    """{(component, module): (down, up, alpha)} in the torch layout; ranks cycle through `ranks`.
    `alpha`: one for every module, or None: per-module alphas, none equal to its rank."""
    rng = np.random.default_rng(seed)
    models = {"unet": pipe.unet, **_text_encoders(pipe)}
    factors = {}
    for component, names in lora_modules(pipe).items():
        modules = dict(models[component].named_modules())
        for i, name in enumerate(names):
            weight = modules[name].weight
            rank = ranks[i % len(ranks)]
            out, fan_in, *kernel = weight.shape
            down = std * rng.standard_normal((rank, fan_in, *kernel))
            up = std * rng.standard_normal((out, rank, *(1 for _ in kernel)))
            a = float(rank + 1 + i % 2) if alpha is None else float(alpha)
            factors[component, name] = (down.astype(np.float32), up.astype(np.float32), a)
    return factors


def kohya_name(component: str, module: str, sdxl: bool = False) -> str:
    """kohya's module name: the path with "." -> "_"; text encoder paths have `text_model.`
    (which transformers 5's CLIPTextModel lacks, its ...WithProjection has) (SDXL: lora_te1_ /
    lora_te2_)."""
    if component == "unet":
        return "lora_unet_" + module.replace(".", "_")
    te = ("te2" if component == "text_encoder_2" else "te1") if sdxl else "te"
    path = module if module.startswith("text_model.") else "text_model." + module
    return f"lora_{te}_" + path.replace(".", "_")


def write_kohya(path, factors: dict, sdxl: bool = False) -> None:
    tensors = {}
    for (component, module), (down, up, alpha) in factors.items():
        name = kohya_name(component, module, sdxl)
        tensors[f"{name}.lora_down.weight"] = torch.from_numpy(down)
        tensors[f"{name}.lora_up.weight"] = torch.from_numpy(up)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    safetensors.torch.save_file(tensors, str(path))


def write_peft(path, factors: dict, alphas: dict[str, float], alpha_patterns=None) -> None:
    """PEFT keys with diffusers' `lora_adapter_metadata` (a LoraConfig per component): one rank
    per component, `alphas[component]` as lora_alpha, `alpha_patterns[component]` as PEFT's
    alpha_pattern. The factors' own alphas are ignored."""
    tensors, metadata = {}, {}
    alpha_patterns = alpha_patterns or {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        mine = {m: f for (c, m), f in factors.items() if c == component}
        if not mine:
            continue
        ranks = {down.shape[0] for down, _, _ in mine.values()}
        assert len(ranks) == 1, "write_peft takes one rank per component"
        for module, (down, up, _) in mine.items():
            tensors[f"{component}.{module}.lora_A.weight"] = torch.from_numpy(down)
            tensors[f"{component}.{module}.lora_B.weight"] = torch.from_numpy(up)
        metadata |= {
            f"{component}.r": ranks.pop(),
            f"{component}.lora_alpha": alphas[component],
            f"{component}.alpha_pattern": alpha_patterns.get(component, {}),
            f"{component}.target_modules": sorted(mine),
        }
    header = {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True), "format": "pt"}
    safetensors.torch.save_file(tensors, str(path), metadata=header)


def apply_factors(pipe, factors: dict, scale: float) -> None:
    """W += scale * alpha / r * up @ down on the torch modules in place (kohya's merge, written
    without diffusers' or peft's LoRA code): the reference for files diffusers reads wrongly."""
    models = {"unet": pipe.unet, **_text_encoders(pipe)}
    with torch.no_grad():
        for (component, module), (down, up, alpha) in factors.items():
            weight = dict(models[component].named_modules())[module].weight
            rank = down.shape[0]
            delta = up.reshape(up.shape[0], rank).astype(np.float64) @ down.reshape(rank, -1)
            delta = (scale * alpha / rank) * delta.reshape(weight.shape)
            weight += torch.from_numpy(delta.astype(np.float32))


def sd2_like_pipeline():
    """The tiny SD pipeline with SD 2.x's linear proj_in / proj_out (use_linear_projection)."""
    components = sd_components()
    config = {k: v for k, v in components["unet"].config.items() if not k.startswith("_")}
    config["use_linear_projection"] = True
    unet = diffusers.UNet2DConditionModel.from_config(config)
    randomize_(unet, 5)
    return diffusers.StableDiffusionPipeline(**(components | {"unet": unet.eval()}))
