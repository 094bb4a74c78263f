"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") with the VGG16 trunk: the perceptual term of the autoencoder loss.

Mirrors the `lpips` package (v0.1) / taming's `LPIPS` that CompVis' LPIPSWithDiscriminator uses:
inputs in [-1, 1] are shifted/scaled, run through VGG16's conv stack, the five relu{k}_{last}
feature maps are unit-normalised over channels, their squared differences weighted by a learned
1x1 conv ("lin" head, no bias), averaged over space and summed over the five layers.

The weights are frozen (never trained here); convert them with `ldm_jax.training.lpips_weights`.
The heads' dropout (active in CompVis training because Lightning puts every submodule in train
mode) is not reproduced: the distance here is deterministic.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# Output channels of each conv of VGG16's five stages; a 2x2 max-pool precedes stages 2-5.
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)
# lpips' ScalingLayer: (x - shift) / scale maps [-1, 1] inputs to ImageNet-normalised ones.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor's eps, added to the norm.
_NORM_EPS = 1e-10
# Inside the square root: keeps the gradient finite where a feature vector is exactly zero (a
# dead ReLU column) without changing the value measurably (sqrt(1e-20) = 1e-10 << typical norms).
_SQRT_FLOOR = 1e-20


def conv_name(stage: int, index: int) -> str:
    """VGG naming: conv{stage}_{index}, both 1-based (conv1_1 ... conv5_3)."""
    return f"conv{stage + 1}_{index + 1}"


def _unit_normalize(f_NHWC):
    norm = jnp.sqrt(jnp.sum(jnp.square(f_NHWC), axis=-1, keepdims=True) + _SQRT_FLOOR)
    return f_NHWC / (norm + _NORM_EPS)


class VGG16Features(nn.Module):
    """VGG16's conv stack; returns the relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 feature maps."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC) -> list[jax.Array]:
        features = []
        h = x_BHWC
        for stage, channels in enumerate(VGG16_STAGES):
            if stage:
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
            for index, width in enumerate(channels):
                h = nn.Conv(
                    width, (3, 3), padding=1, dtype=self.dtype, name=conv_name(stage, index)
                )(h)
                h = nn.relu(h)
            features.append(h)
        return features


class LPIPS(nn.Module):
    """LPIPS distance between two NHWC image batches in [-1, 1] -> [B] (fp32)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x0_BHWC, x1_BHWC) -> jax.Array:
        if x0_BHWC.shape != x1_BHWC.shape or x0_BHWC.ndim != 4 or x0_BHWC.shape[-1] != 3:
            raise ValueError(
                "LPIPS compares two RGB batches of the same shape [B, H, W, 3]; got "
                f"{x0_BHWC.shape} and {x1_BHWC.shape}"
            )
        if min(x0_BHWC.shape[1:3]) < 16:
            raise ValueError(
                f"LPIPS needs images of at least 16x16 (VGG16 pools four times); got "
                f"{x0_BHWC.shape[1]}x{x0_BHWC.shape[2]}"
            )
        batch = x0_BHWC.shape[0]
        shift = jnp.asarray(_SHIFT, jnp.float32)
        scale = jnp.asarray(_SCALE, jnp.float32)
        # One pass over both batches: half the kernel launches of two passes.
        both = jnp.concatenate([x0_BHWC, x1_BHWC]).astype(jnp.float32)
        scaled = ((both - shift) / scale).astype(self.dtype)
        features = VGG16Features(self.dtype, name="vgg")(scaled)
        distance_B = jnp.zeros((batch,), jnp.float32)
        for k, f in enumerate(features):
            f = _unit_normalize(f.astype(jnp.float32))
            diff_BHWC = jnp.square(f[:batch] - f[batch:])
            weighted = nn.Dense(1, use_bias=False, name=f"lin{k}")(diff_BHWC)
            distance_B = distance_B + jnp.mean(weighted, axis=(1, 2, 3))
        return distance_B


def lpips_param_shapes() -> dict:
    """The parameter tree's shapes ({"vgg": {conv1_1: {kernel, bias}, ...}, "lin0": ...})."""
    x = jnp.zeros((1, 16, 16, 3), jnp.float32)
    return jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), x, x))["params"]
