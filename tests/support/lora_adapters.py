"""Random LoRA adapters in the training layout (ldm_jax/training/lora_adapters.py), for the LoRA
writers' tests: adapters[network][*path]["lora_down"] (*lead, in, r) and ["lora_up"]
(*1s, r, out) for the kernel at params[network][*path, "kernel"] of shape (*lead, in, out)."""

import flax
import numpy as np

from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.checkpoints.lora import lora_targets

# What is adapted: UNet attention projections, transformer proj_in (a 1x1 conv in SD 1.x, linear
# in SD 2.x / XL), a res block's 3x3 conv1 ("LoCon"), and the text encoders' attention.
UNET_MODULES = (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".resnets.0.conv1")
TEXT_MODULES = (".q_proj", ".k_proj", ".v_proj", ".out_proj")


def adapted_kernels(spec) -> list[tuple[str, ...]]:
    """(network, *kernel path) of the layers these tests adapt, picked by their diffusers /
    transformers module names in the read side's table."""
    chosen = set()
    for name, target in lora_targets(spec).items():
        unet = name.startswith("unet.") and name.endswith(UNET_MODULES)
        text = name.startswith("text_encoder") and name.endswith(TEXT_MODULES)
        if unet or text:
            chosen.add((target.network, *target.flax_path))
    return sorted(chosen)


def random_adapters(spec, params, seed: int, ranks=(2, 3, 4), std: float = 0.2) -> dict:
    """Random factors (up nonzero) for `adapted_kernels(spec)`; ranks cycle through `ranks`."""
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(v.shape) for k, v in flatten_params(params).items()}
    flat = {}
    for i, kernel in enumerate(adapted_kernels(spec)):
        *lead, fan_in, fan_out = shapes[kernel]
        rank = ranks[i % len(ranks)]
        down = std * rng.standard_normal((*lead, fan_in, rank))
        up = std * rng.standard_normal((*(1 for _ in lead), rank, fan_out))
        flat[(*kernel[:-1], "lora_down")] = down.astype(np.float32)
        flat[(*kernel[:-1], "lora_up")] = up.astype(np.float32)
    return flax.traverse_util.unflatten_dict(flat)


def adapter_deltas(adapters, alpha: float) -> dict[tuple[str, ...], np.ndarray]:
    """{(network, *kernel path): (alpha / r) * reshape(down @ up, K)} in float64: the contract's
    formula, written out here independently of the writers and readers."""
    flat = flax.traverse_util.flatten_dict(adapters)
    deltas = {}
    for path, down in flat.items():
        if path[-1] != "lora_down":
            continue
        up = flat[(*path[:-1], "lora_up")].astype(np.float64)
        rank = down.shape[-1]
        product = down.astype(np.float64).reshape(-1, rank) @ up.reshape(rank, -1)
        kernel_shape = (*down.shape[:-1], up.shape[-1])
        deltas[(*path[:-1], "kernel")] = (alpha / rank) * product.reshape(kernel_shape)
    return deltas
