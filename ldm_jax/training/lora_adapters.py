"""LoRA adapters as trainable parameters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), for the latent-diffusion train step.

A frozen kernel W (flax shape K = (*lead, in, out); lead = () for Dense, (kh, kw) for Conv) is used
as

    W' = W + (alpha / r) * reshape(D @ U, K),   D = down [(*lead, in) -> r],  U = up [r -> out]

with D ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))) and U = 0, so
training starts at the base model. The adapter tree mirrors the params it adapts:

    adapters[network][*path]["lora_down"]  (*lead, in, r)
    adapters[network][*path]["lora_up"]    (*1s, r, out)     # (r, out) or (1, 1, r, out)

for each kernel at params[network][*path, "kernel"]. This is the layout the LoRA writers of
ldm_jax/checkpoints/lora export. Each factor carries its kernel's logical axes on the side it
shares with the kernel (down: fan_in, up: fan_out; r is never sharded), so the adapters shard
with their kernels under FSDP and the optimizer state follows.

W' is formed inside the compiled step (one kernel-sized temporary per adapted layer) rather than
by rewriting the modules: the networks stay the ones sampling and full fine-tuning use, and the
merged weights are exactly what a merged export holds.
"""

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

DOWN, UP = "lora_down", "lora_up"


@dataclasses.dataclass(frozen=True)
class LoRATraining:
    """Which kernels get an adapter, its rank and alpha. `layers`: (network, *kernel path) each,
    e.g. ("unet", "down_blocks_0", ..., "to_q", "kernel"); chosen by the task from the
    checkpoint's module names (ldm_jax/training/lora_task.py)."""

    rank: int
    alpha: float
    layers: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0; got {self.alpha}")
        if not self.layers:
            raise ValueError("LoRA training needs at least one target layer")
        bad = [layer for layer in self.layers if layer[-1] != "kernel" or len(layer) < 3]
        if bad:
            raise ValueError(f"LoRA layers must name kernels (network, ..., 'kernel'): {bad[:3]}")

    @property
    def networks(self) -> tuple[str, ...]:
        """The networks with adapters, in a fixed order ("unet" first)."""
        names = {layer[0] for layer in self.layers}
        return tuple(n for n in ("unet", "cond_stage") if n in names) + tuple(
            sorted(names - {"unet", "cond_stage"})
        )

    @property
    def factor(self) -> float:
        return self.alpha / self.rank


def _factor_shapes(kernel_shape: tuple[int, ...], rank: int) -> tuple[tuple, tuple]:
    *lead, fan_in, fan_out = kernel_shape
    return (*lead, fan_in, rank), (*([1] * len(lead)), rank, fan_out)


def _factor_names(kernel_names: tuple, rank_axes: int) -> tuple[tuple, tuple]:
    *lead, fan_in, fan_out = kernel_names
    return (*lead, fan_in, None), (*([None] * rank_axes), None, fan_out)


def init_adapters(boxed_params: dict[str, Any], lora: LoRATraining, rng: jax.Array) -> dict:
    """The step-0 adapter tree, boxed (nn.LogicallyPartitioned) like the kernels it adapts.

    `boxed_params`: {network: boxed params} (abstract or concrete; only shapes and names are read).
    Call inside jit / eval_shape (create_sharded_state does) so each factor is made on its shards.
    """
    flat = {
        (network, *path): leaf
        for network, tree in boxed_params.items()
        for path, leaf in flax.traverse_util.flatten_dict(
            tree, is_leaf=lambda _, x: _is_box(x)
        ).items()
    }
    missing = [layer for layer in lora.layers if layer not in flat]
    if missing:
        raise ValueError(f"LoRA targets with no kernel in the params: {missing[:3]}")
    adapters = {}
    for layer, key in zip(lora.layers, jax.random.split(rng, len(lora.layers)), strict=True):
        box = flat[layer]
        shape = tuple(box.value.shape) if _is_box(box) else tuple(box.shape)
        down_shape, up_shape = _factor_shapes(shape, lora.rank)
        fan_in = math.prod(down_shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        down = jax.random.uniform(key, down_shape, jnp.float32, -bound, bound)
        up = jnp.zeros(up_shape, jnp.float32)
        if _is_box(box):
            down_names, up_names = _factor_names(tuple(box.names), len(shape) - 2)
            down = nn.LogicallyPartitioned(down, down_names)
            up = nn.LogicallyPartitioned(up, up_names)
        adapters[layer[:-1] + (DOWN,)] = down
        adapters[layer[:-1] + (UP,)] = up
    return flax.traverse_util.unflatten_dict(adapters)


def layer_delta(down: jax.Array, up: jax.Array, factor: float, kernel_shape) -> jax.Array:
    """(alpha / r) * reshape(down @ up, K) in float32."""
    rank = down.shape[-1]
    product = down.reshape(-1, rank).astype(jnp.float32) @ up.reshape(rank, -1).astype(jnp.float32)
    return (factor * product).reshape(kernel_shape)


def merge_adapters(params: dict[str, Any], adapters: dict[str, Any], factor: float) -> dict:
    """{network: params} with W + delta for every adapted kernel (jnp; differentiable in the
    adapters); networks without adapters and untouched leaves are passed through."""
    merged = dict(params)
    for network, tree in adapters.items():
        flat = flax.traverse_util.flatten_dict(params[network])
        for path, factors in _adapter_layers(tree):
            kernel = flat[(*path, "kernel")]
            delta = layer_delta(factors[DOWN], factors[UP], factor, kernel.shape)
            flat[(*path, "kernel")] = kernel + delta.astype(kernel.dtype)
        merged[network] = flax.traverse_util.unflatten_dict(flat)
    return merged


def _adapter_layers(tree) -> list[tuple[tuple[str, ...], dict]]:
    """[(path of the adapted module, {"lora_down": D, "lora_up": U})] of one network's adapters."""
    flat = flax.traverse_util.flatten_dict(tree)
    layers = {}
    for path, value in flat.items():
        layers.setdefault(path[:-1], {})[path[-1]] = value
    for path, factors in layers.items():
        if set(factors) != {DOWN, UP}:
            raise ValueError(f"adapter {'/'.join(path)} has {sorted(factors)}; needs {DOWN}, {UP}")
    return sorted(layers.items())


def adapter_count(adapters) -> int:
    """Number of trainable adapter parameters."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(adapters))


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)
