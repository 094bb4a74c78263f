"""Non-text conditioning encoders of LDM: class embeddings and spatial rescaling.

`ClassEmbedder` mirrors CompVis' ClassEmbedder (ldm/modules/encoders/modules.py; the
Stability-AI version adds the extra "null" class used for classifier-free guidance), and
`SpatialRescaler` mirrors CompVis' SpatialRescaler, whose resizing is
`torch.nn.functional.interpolate(x, scale_factor=multiplier, mode=method)` reproduced exactly here.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.layers import Dtype, conv, embedding


@dataclasses.dataclass(frozen=True)
class ClassEmbedderConfig:
    n_classes: int = 1000
    embed_dim: int = 512
    # The class id that means "no label" (classifier-free guidance). Stability-AI's ClassEmbedder
    # uses n_classes - 1 (cin256-v2: 1001 classes, null class 1000); CompVis' original has none.
    null_class: int | None = None

    def __post_init__(self):
        if self.null_class is not None and not 0 <= self.null_class < self.n_classes:
            raise ValueError(
                f"null_class must be in [0, {self.n_classes - 1}]; got {self.null_class}"
            )


class ClassEmbedder(nn.Module):
    """class ids [B] -> embeddings [B, 1, embed_dim], a one-token context for cross-attention."""

    config: ClassEmbedderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, class_ids_B):
        cfg = self.config
        if np.ndim(class_ids_B) != 1:
            raise ValueError(f"class ids must be shaped [batch]; got {np.shape(class_ids_B)}")
        dtype = jnp.asarray(class_ids_B).dtype
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"class ids must be integers; got dtype {dtype}")
        try:
            ids = np.asarray(class_ids_B)
        except jax.errors.TracerArrayConversionError:  # traced under jit: values unknown
            ids = None
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= cfg.n_classes):
            raise ValueError(
                f"class ids must lie in [0, {cfg.n_classes - 1}]; "
                f"got values in [{ids.min()}, {ids.max()}]"
            )
        table = embedding(cfg.n_classes, cfg.embed_dim, name="embedding")
        return table(jnp.asarray(class_ids_B))[:, None, :].astype(self.dtype)


def _null_class(config: ClassEmbedderConfig) -> int:
    if config.null_class is None:
        raise ValueError(
            f"this class embedder ({config.n_classes} classes) has no null class for "
            "classifier-free guidance; set ClassEmbedderConfig.null_class"
        )
    return config.null_class


def unconditional_class_ids(config: ClassEmbedderConfig, batch: int) -> jax.Array:
    """[batch] ids of the null class: the unconditional input of classifier-free guidance."""
    return jnp.full((batch,), _null_class(config), dtype=jnp.int32)


def drop_class_labels(
    config: ClassEmbedderConfig, class_ids_B: jax.Array, rate: float, rng: jax.Array
) -> jax.Array:
    """Replace each label by the null class with probability `rate` (CompVis ucg_rate)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label drop rate must be in [0, 1]; got {rate}")
    drop_B = jax.random.bernoulli(rng, rate, np.shape(class_ids_B))
    return jnp.where(drop_B, _null_class(config), class_ids_B).astype(class_ids_B.dtype)


# --------------------------------------------------------------------------- spatial rescaling

INTERPOLATION_METHODS = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
_CUBIC_A = -0.75  # torch's bicubic convolution coefficient


@dataclasses.dataclass(frozen=True)
class SpatialRescalerConfig:
    n_stages: int = 1
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 3
    out_channels: int | None = None  # None: no 1x1 channel remapping
    bias: bool = False  # bias of the 1x1 remapping conv

    def __post_init__(self):
        if self.method not in INTERPOLATION_METHODS:
            raise ValueError(
                f"unsupported interpolation method {self.method!r}; "
                f"allowed: {INTERPOLATION_METHODS}"
            )
        if self.n_stages < 0:
            raise ValueError(f"n_stages must be >= 0; got {self.n_stages}")
        if not self.multiplier > 0:
            raise ValueError(f"multiplier must be > 0; got {self.multiplier}")


def _source_taps(in_size: int, out_size: int, scale_factor: float, method: str):
    """(indices [out, K], weights [out, K]) such that y[o] = sum_k w[o, k] * x[idx[o, k]].

    Reproduces torch's CPU upsample kernels with align_corners=False and a given scale_factor:
    the source coordinate uses 1 / scale_factor (not in/out), computed in float32 like torch.
    """
    scale = np.float32(1.0 / scale_factor)
    dst = np.arange(out_size, dtype=np.float32)
    if method == "nearest":  # floor(dst * scale), torch's legacy "nearest"
        if out_size in (in_size, 2 * in_size):  # torch's shortcuts ignore scale_factor here
            idx = (np.arange(out_size) * in_size // out_size)[:, None]
        else:
            idx = np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)[:, None]
        return idx, np.ones_like(idx, dtype=np.float32)
    if method == "nearest-exact":  # pixel-centre rounding
        src = np.floor((dst + np.float32(0.5)) * scale).astype(np.int64)
        idx = np.minimum(src, in_size - 1)[:, None]
        return idx, np.ones_like(idx, dtype=np.float32)
    if method == "area":  # adaptive average pooling over [floor(o*in/out), ceil((o+1)*in/out))
        starts = [(o * in_size) // out_size for o in range(out_size)]
        ends = [-(-((o + 1) * in_size) // out_size) for o in range(out_size)]
        width = max(e - s for s, e in zip(starts, ends, strict=True))
        idx = np.zeros((out_size, width), np.int64)
        weights = np.zeros((out_size, width), np.float32)
        for o, (s, e) in enumerate(zip(starts, ends, strict=True)):
            idx[o, : e - s] = np.arange(s, e)
            weights[o, : e - s] = 1.0 / (e - s)
        return idx, weights
    if method == "bilinear" and out_size == in_size:  # torch's CPU kernel skips such an axis
        idx = np.arange(out_size)[:, None]
        return idx, np.ones_like(idx, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    if method == "bilinear":
        src = np.maximum(src, np.float32(0.0))
        i0 = src.astype(np.int64)  # truncation == floor for src >= 0
        i1 = np.minimum(i0 + 1, in_size - 1)
        lam1 = src - i0.astype(np.float32)
        return np.stack([i0, i1], 1), np.stack([np.float32(1.0) - lam1, lam1], 1)
    # bicubic: 4 taps around floor(src), indices clamped to the border
    i0 = np.floor(src).astype(np.int64)
    t = (src - i0.astype(np.float32)).astype(np.float64)
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1).astype(np.float32)
    idx = np.clip(i0[:, None] + np.arange(-1, 3)[None], 0, in_size - 1)
    return idx, weights


def _resize_axis(x, axis: int, scale_factor: float, method: str):
    in_size = x.shape[axis]
    out_size = math.floor(in_size * scale_factor)  # torch: floor(float(in) * scale)
    if out_size < 1:
        raise ValueError(
            f"rescaling a size-{in_size} axis by {scale_factor} leaves no pixels; "
            f"inputs need size >= {math.ceil(1 / scale_factor)}"
        )
    idx, weights = _source_taps(in_size, out_size, scale_factor, method)
    bshape = [1] * x.ndim
    bshape[axis] = out_size
    out = 0
    for k in range(idx.shape[1]):  # gathers and fp32 products: exact on every backend
        tap = jnp.take(x, jnp.asarray(idx[:, k]), axis=axis)
        out = out + tap * jnp.asarray(weights[:, k], x.dtype).reshape(bshape)
    return out


def interpolate(x_BHWC: jax.Array, scale_factor: float, method: str) -> jax.Array:
    """torch.nn.functional.interpolate(x, scale_factor=..., mode=method) on NHWC data
    (align_corners=False, no antialiasing, output size floor(in * scale_factor))."""
    if method not in INTERPOLATION_METHODS:
        raise ValueError(
            f"unsupported interpolation method {method!r}; allowed: {INTERPOLATION_METHODS}"
        )
    if x_BHWC.ndim != 4:
        raise ValueError(f"interpolate takes [B, H, W, C] images; got shape {x_BHWC.shape}")
    y = _resize_axis(x_BHWC, 1, scale_factor, method)
    return _resize_axis(y, 2, scale_factor, method)


class SpatialRescaler(nn.Module):
    """n_stages x interpolate(multiplier, method), then an optional 1x1 conv to out_channels."""

    config: SpatialRescalerConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        cfg = self.config
        if x_BHWC.ndim != 4:
            raise ValueError(f"SpatialRescaler takes [B, H, W, C] images; got {x_BHWC.shape}")
        if cfg.out_channels is not None and x_BHWC.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"SpatialRescaler expects {cfg.in_channels} input channels; got {x_BHWC.shape[-1]}"
            )
        x_BHWC = x_BHWC.astype(self.dtype)
        for _ in range(cfg.n_stages):
            x_BHWC = interpolate(x_BHWC, cfg.multiplier, cfg.method)
        if cfg.out_channels is not None:
            remap = conv(
                cfg.out_channels, 1, name="channel_mapper", dtype=self.dtype, use_bias=cfg.bias
            )
            x_BHWC = remap(x_BHWC)
        return x_BHWC
