"""Building blocks of the latent UNet, as CompVis ldm/modules/diffusionmodules/openaimodel.py.

`timestep_embedding` mirrors CompVis' util.timestep_embedding (cos first; diffusers Timesteps with
flip_sin_to_cos=True, freq_shift=0), `ResBlock` openaimodel.ResBlock (diffusers ResnetBlock2D),
`Downsample`/`Upsample` openaimodel.Downsample/Upsample (diffusers Downsample2D/Upsample2D).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype, GroupNorm, conv, dense

# openaimodel's normalization(): GroupNorm32 with torch's default eps. The group count is a
# UNetConfig hyper-parameter (diffusers norm_num_groups); CompVis always uses this default.
NORM_GROUPS = 32
NORM_EPS = 1e-5


def timestep_embedding(timesteps_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] in fp32: [cos(t f), sin(t f)], f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps_B.astype(jnp.float32)[:, None] * freqs[None]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def upsample_nearest_2x(x_BHWC: jax.Array) -> jax.Array:
    """F.interpolate(scale_factor=2, mode="nearest") on NHWC: every pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)


def avg_pool_2x(x_BHWC: jax.Array) -> jax.Array:
    """avg_pool2d(kernel_size=2, stride=2) on NHWC."""
    return nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Halve H and W: stride-2 3x3 conv with padding 1, or a 2x2 average pool without conv."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        if self.use_conv:
            channels = x_BHWC.shape[-1]
            return conv(channels, 3, strides=2, padding=1, name="op", dtype=self.dtype)(x_BHWC)
        return avg_pool_2x(x_BHWC)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then (optionally) a 3x3 conv."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        x_BHWC = upsample_nearest_2x(x_BHWC)
        if self.use_conv:
            x_BHWC = conv(x_BHWC.shape[-1], 3, name="conv", dtype=self.dtype)(x_BHWC)
        return x_BHWC


class ResBlock(nn.Module):
    """openaimodel.ResBlock: norm-SiLU-conv, timestep projection, norm-SiLU-dropout-conv, skip.

    With `use_scale_shift_norm` the embedding gives (scale, shift) applied as
    norm(h) * (1 + scale) + shift (FiLM); otherwise it is added before the second norm.
    `resample` "down"/"up" resamples both paths after the first norm (resblock_updown).
    """

    out_channels: int
    use_scale_shift_norm: bool = False
    resample: str | None = None  # None, "down" or "up"
    dropout: float = 0.0
    zero_init: bool = True  # zero_module on the last conv, as openaimodel initialises it
    dtype: Dtype = jnp.float32
    norm_num_groups: int = NORM_GROUPS

    @nn.compact
    def __call__(self, x_BHWC, emb_BE, deterministic: bool = True):
        if self.resample not in (None, "down", "up"):
            raise ValueError(f"ResBlock resample must be None, 'down' or 'up'; got {self.resample}")

        def norm(name):
            return GroupNorm(self.norm_num_groups, NORM_EPS, self.dtype, name=name)

        h = nn.silu(norm("in_norm")(x_BHWC))
        if self.resample == "down":
            h, x_BHWC = avg_pool_2x(h), avg_pool_2x(x_BHWC)
        elif self.resample == "up":
            h, x_BHWC = upsample_nearest_2x(h), upsample_nearest_2x(x_BHWC)
        h = conv(self.out_channels, 3, name="in_conv", dtype=self.dtype)(h)

        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = dense(emb_width, name="emb_proj", dtype=self.dtype)(nn.silu(emb_BE))
        emb_out = emb_out[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm("out_norm")(h) * (1 + scale) + shift
        else:
            h = norm("out_norm")(h + emb_out)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        out_conv = conv(
            self.out_channels, 3, name="out_conv", dtype=self.dtype, zero_init=self.zero_init
        )
        h = out_conv(h)

        if x_BHWC.shape[-1] != self.out_channels:
            x_BHWC = conv(self.out_channels, 1, name="skip", dtype=self.dtype)(x_BHWC)
        return x_BHWC + h
