"""The KL-regularised perceptual autoencoder of Latent Diffusion (the Stable Diffusion VAE).

Mirrors CompVis `ldm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, Downsample,
Upsample, AttnBlock) and `ldm/models/autoencoder.py` (AutoencoderKL), whose numerics diffusers'
`AutoencoderKL` reproduces. Parameter names follow CompVis (`down_{level}/block_{i}`,
`mid/attn_1`, `up_{level}`, ...) with `up_{level}` indexed like CompVis' `up` list, i.e. level 0
is the full-resolution (last-run) stage of the decoder.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import AttentionBlock
from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.models.layers import Dtype, GroupNorm, conv

# CompVis' Normalize(): GroupNorm(32 groups, eps 1e-6) everywhere in the autoencoder; the group
# count is AutoencoderConfig.norm_num_groups (diffusers' norm_num_groups), 32 in CompVis.
_GROUPS, _EPS = 32, 1e-6


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """CompVis `ddconfig` plus `embed_dim`; the defaults are the Stable Diffusion VAE (kl-f8)."""

    in_channels: int = 3
    out_channels: int = 3  # CompVis out_ch
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Attention after every resnet of a level whose resolution (resolution / 2**level) is listed.
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256  # the training resolution; only used to place attention
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True  # the encoder outputs mean and log-variance (KL) or latents only (VQ)
    dropout: float = 0.0
    mid_attention: bool = True  # False: CompVis attn_type "none" (vq-f4-noattn)
    norm_num_groups: int = _GROUPS  # GroupNorm groups of every norm (diffusers norm_num_groups)

    def __post_init__(self):
        groups = self.norm_num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"norm_num_groups must be an int >= 1; got {groups!r}")
        if not all(type(v) is int for v in (self.ch, *self.ch_mult)):
            return  # wrong types: validate_spec names them; no arithmetic on untrusted values
        # every GroupNorm sees ch (after conv_in) or a level's width ch x ch_mult
        widths = sorted({self.ch} | {m * self.ch for m in self.ch_mult})
        bad = [c for c in widths if c % groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={groups} must divide the channels of every GroupNorm "
                f"(ch x ch_mult = {widths}); {bad} are not divisible"
            )

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    def attends_at(self, level: int) -> bool:
        return self.resolution // 2**level in self.attn_resolutions


def check_image(config: AutoencoderConfig, x_BHWC: jax.Array) -> None:
    """Raise ValueError unless x is [B, H, W, in_channels] with H, W multiples of the factor."""
    if x_BHWC.ndim != 4:
        raise ValueError(f"expected an NHWC image batch [B, H, W, C]; got shape {x_BHWC.shape}")
    _, h, w, c = x_BHWC.shape
    if c != config.in_channels:
        raise ValueError(f"expected {config.in_channels} input channels (NHWC); got {c}")
    f = config.downsample_factor
    if h % f or w % f:
        raise ValueError(
            f"image height and width must be multiples of the downsampling factor {f}; got {h}x{w}"
        )


def check_latent(x_BHWC: jax.Array, channels: int) -> None:
    """Raise ValueError unless x is [B, h, w, channels]."""
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != channels:
        raise ValueError(f"expected latents [B, h, w, {channels}] (NHWC); got {x_BHWC.shape}")


class ResnetBlock(nn.Module):
    """CompVis ResnetBlock without time embedding (diffusers ResnetBlock2D with temb=None)."""

    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    norm_num_groups: int = _GROUPS

    @nn.compact
    def __call__(self, x_BHWC, *, deterministic: bool = True):
        groups = self.norm_num_groups
        h = nn.silu(GroupNorm(groups, _EPS, self.dtype, name="norm1")(x_BHWC))
        h = conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(h)
        h = nn.silu(GroupNorm(groups, _EPS, self.dtype, name="norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(h)
        if x_BHWC.shape[-1] != self.out_channels:
            x_BHWC = conv(self.out_channels, 1, name="nin_shortcut", dtype=self.dtype)(x_BHWC)
        return x_BHWC + h


class Downsample(nn.Module):
    """Halve H and W: zero-pad bottom/right by one, then a stride-2 3x3 conv without padding."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        channels = x_BHWC.shape[-1]
        return conv(
            channels, 3, name="conv", dtype=self.dtype, strides=2, padding=((0, 1), (0, 1))
        )(x_BHWC)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        return conv(x_BHWC.shape[-1], 3, name="conv", dtype=self.dtype)(x_BHWC)


class _Level(nn.Module):
    """One resolution of the encoder or decoder: resnets (each optionally followed by
    attention), then an optional down/up-sampling ("down", "up" or None)."""

    out_channels: int
    num_blocks: int
    attention: bool
    resample: str | None
    dropout: float
    attention_implementation: str | None
    dtype: Dtype
    norm_num_groups: int = _GROUPS

    @nn.compact
    def __call__(self, h, *, deterministic: bool):
        for i in range(self.num_blocks):
            h = _resnet(self, self.out_channels, f"block_{i}")(h, deterministic=deterministic)
            if self.attention:
                h = _attention(self, f"attn_{i}")(h)
        if self.resample == "down":
            h = Downsample(self.dtype, name="downsample")(h)
        elif self.resample == "up":
            h = Upsample(self.dtype, name="upsample")(h)
        return h


class _MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    attention: bool
    dropout: float
    attention_implementation: str | None
    dtype: Dtype
    norm_num_groups: int = _GROUPS

    @nn.compact
    def __call__(self, h, *, deterministic: bool):
        channels = h.shape[-1]
        h = _resnet(self, channels, "block_1")(h, deterministic=deterministic)
        if self.attention:
            h = _attention(self, "attn_1")(h)
        return _resnet(self, channels, "block_2")(h, deterministic=deterministic)


def _resnet(parent: nn.Module, out_channels: int, name: str) -> ResnetBlock:
    return ResnetBlock(
        out_channels, parent.dropout, parent.dtype, parent.norm_num_groups, name=name
    )


def _attention(parent: nn.Module, name: str) -> AttentionBlock:
    # CompVis AttnBlock: one head over all channels, GroupNorm eps 1e-6.
    return AttentionBlock(
        num_heads=1,
        norm_eps=_EPS,
        implementation=parent.attention_implementation,
        dtype=parent.dtype,
        norm_num_groups=parent.norm_num_groups,
        name=name,
    )


def _output_head(module: nn.Module, h, out_channels: int):
    """norm_out -> SiLU -> conv_out, the last layers of both encoder and decoder."""
    groups = module.config.norm_num_groups
    h = nn.silu(GroupNorm(groups, _EPS, module.dtype, name="norm_out")(h))
    return conv(out_channels, 3, name="conv_out", dtype=module.dtype)(h)


class Encoder(nn.Module):
    """CompVis Encoder: image [B, H, W, in] -> [B, H/f, W/f, (2 if double_z) * z_channels]."""

    config: AutoencoderConfig
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC, *, deterministic: bool = True):
        cfg = self.config
        check_image(cfg, x_BHWC)
        h = conv(cfg.ch, 3, name="conv_in", dtype=self.dtype)(x_BHWC)
        for level, mult in enumerate(cfg.ch_mult):
            h = _Level(
                cfg.ch * mult,
                cfg.num_res_blocks,
                cfg.attends_at(level),
                "down" if level != cfg.num_levels - 1 else None,
                cfg.dropout,
                self.attention_implementation,
                self.dtype,
                cfg.norm_num_groups,
                name=f"down_{level}",
            )(h, deterministic=deterministic)
        h = _MidBlock(
            cfg.mid_attention,
            cfg.dropout,
            self.attention_implementation,
            self.dtype,
            cfg.norm_num_groups,
            name="mid",
        )(h, deterministic=deterministic)
        out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        return _output_head(self, h, out)


class Decoder(nn.Module):
    """CompVis Decoder: latent [B, h, w, z_channels] -> image [B, h*f, w*f, out_channels]."""

    config: AutoencoderConfig
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_BHWC, *, deterministic: bool = True):
        cfg = self.config
        check_latent(z_BHWC, cfg.z_channels)
        h = conv(cfg.ch * cfg.ch_mult[-1], 3, name="conv_in", dtype=self.dtype)(z_BHWC)
        h = _MidBlock(
            cfg.mid_attention,
            cfg.dropout,
            self.attention_implementation,
            self.dtype,
            cfg.norm_num_groups,
            name="mid",
        )(h, deterministic=deterministic)
        for level in reversed(range(cfg.num_levels)):
            h = _Level(
                cfg.ch * cfg.ch_mult[level],
                cfg.num_res_blocks + 1,
                cfg.attends_at(level),
                "up" if level != 0 else None,
                cfg.dropout,
                self.attention_implementation,
                self.dtype,
                cfg.norm_num_groups,
                name=f"up_{level}",
            )(h, deterministic=deterministic)
        return _output_head(self, h, cfg.out_channels)


class AutoencoderKL(nn.Module):
    """CompVis AutoencoderKL: encoder -> quant_conv -> DiagonalGaussian; post_quant_conv -> decoder.

    Use `model.apply(variables, x, method="encode")` for the posterior and
    `method="decode"` to map latents [B, h, w, embed_dim] back to images.
    """

    config: AutoencoderConfig
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        if not cfg.double_z:
            raise ValueError(
                "AutoencoderKL needs double_z=True: its encoder predicts mean and logvar"
            )
        kwargs = dict(attention_implementation=self.attention_implementation, dtype=self.dtype)
        self.encoder = Encoder(cfg, **kwargs)
        self.quant_conv = conv(2 * cfg.embed_dim, 1, name="quant_conv", dtype=self.dtype)
        self.post_quant_conv = conv(cfg.z_channels, 1, name="post_quant_conv", dtype=self.dtype)
        self.decoder = Decoder(cfg, **kwargs)

    def encode(self, x_BHWC, *, deterministic: bool = True) -> DiagonalGaussian:
        moments = self.quant_conv(self.encoder(x_BHWC, deterministic=deterministic))
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z_BHWC, *, deterministic: bool = True):
        check_latent(z_BHWC, self.config.embed_dim)
        return self.decoder(self.post_quant_conv(z_BHWC), deterministic=deterministic)

    def __call__(self, x_BHWC, rng=None, sample_posterior: bool = True, *, deterministic=True):
        """(reconstruction, posterior); decodes a posterior sample, or its mode when rng is None."""
        posterior = self.encode(x_BHWC, deterministic=deterministic)
        z = posterior.sample(rng) if sample_posterior and rng is not None else posterior.mode()
        return self.decode(z, deterministic=deterministic), posterior
