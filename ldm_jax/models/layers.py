"""Building blocks shared by every network: dense/conv layers whose parameters carry logical axis
names (so sharding rules can be applied later without touching model code) and fp32 normalisation.

Logical axis names used for parameters:
    "fan_in" / "fan_out"  input / output features of a dense or conv kernel
    "kernel_h", "kernel_w" spatial axes of a conv kernel (never sharded)
    "vocab", "embed"       token / position / class embedding tables
    "norm"                 per-channel scale and bias of a normalisation layer
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torch's default initialisers differ, but the parameters of these networks are always either
# trained from scratch or loaded from a checkpoint, so flax's standard initialisers are fine.
_KERNEL_INIT = nn.initializers.lecun_normal()
_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()


def dense(
    features: int, *, name: str, dtype: Dtype, use_bias: bool = True, zero_init: bool = False
) -> nn.Dense:
    """A Dense layer (kernel [in, out]) with logically named parameters.

    `zero_init` starts the kernel at zero (CompVis zero_module: a residual branch that begins as
    the identity).
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            _ZEROS if zero_init else _KERNEL_INIT, ("fan_in", "fan_out")
        ),
        bias_init=nn.with_logical_partitioning(_ZEROS, ("fan_out",)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    name: str,
    dtype: Dtype,
    strides: int = 1,
    padding: str | int | Sequence[tuple[int, int]] | None = None,
    use_bias: bool = True,
    zero_init: bool = False,
) -> nn.Conv:
    """An NHWC Conv (kernel [kh, kw, in, out]); default padding k // 2 ("same" for odd k).

    `zero_init` starts the kernel at zero, as CompVis zero_module does.
    """
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            _ZEROS if zero_init else _KERNEL_INIT, ("kernel_h", "kernel_w", "fan_in", "fan_out")
        ),
        bias_init=nn.with_logical_partitioning(_ZEROS, ("fan_out",)),
        name=name,
    )


def embedding(
    num_embeddings: int,
    features: int,
    *,
    name: str,
    init_std: float = 0.02,
    init: nn.initializers.Initializer | None = None,
) -> nn.Embed:
    """An embedding table [num_embeddings, features] (always stored and looked up in fp32).

    `init` overrides the default normal(init_std) initialiser (e.g. a VQ codebook's uniform one).
    """
    return nn.Embed(
        num_embeddings,
        features,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            init or nn.initializers.normal(init_std), ("vocab", "embed")
        ),
        name=name,
    )


class GroupNorm(nn.Module):
    """GroupNorm over NHWC (or [B, T, C]) data; statistics in fp32, result cast to `dtype`."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm needs channels divisible by {self.num_groups} groups; "
                f"got {channels} channels"
            )
        scale, bias = _norm_params(self, channels)
        x32 = x.astype(jnp.float32)
        groups = x32.reshape(x.shape[0], -1, self.num_groups, channels // self.num_groups)
        # E[(x - mu)^2] as torch computes it; E[x^2] - mu^2 loses precision.
        mean = groups.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(groups - mean).mean(axis=(1, 3), keepdims=True)
        y = ((groups - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; statistics in fp32, result cast to `dtype`."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale, bias = _norm_params(self, x.shape[-1])
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(self.dtype)


def _norm_params(module: nn.Module, channels: int):
    scale = module.param(
        "scale", nn.with_logical_partitioning(_ONES, ("norm",)), (channels,), jnp.float32
    )
    bias = module.param(
        "bias", nn.with_logical_partitioning(_ZEROS, ("norm",)), (channels,), jnp.float32
    )
    return scale, bias


def quick_gelu(x):
    """CLIP's sigmoid approximation of GELU."""
    return x * nn.sigmoid(1.702 * x)


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU() / F.gelu default."""
    return nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "silu": nn.silu}
