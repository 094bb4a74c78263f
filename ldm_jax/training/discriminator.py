"""The patch-GAN discriminator of the autoencoder loss: taming's NLayerDiscriminator (pix2pix).

conv(4x4, stride 2) -> LeakyReLU(0.2), then `n_layers - 1` x [conv(4x4, stride 2, no bias) ->
BatchNorm -> LeakyReLU], conv(4x4, stride 1, no bias) -> BatchNorm -> LeakyReLU, and a 4x4
stride-1 conv to one logit per patch. Convs pad by 1 on every side, as torch's padding=1.

Initialised like taming's `weights_init`: conv kernels ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02),
bias 0. BatchNorm runs on batch statistics in training (`train=True`, mutable "batch_stats"),
as the PyTorch discriminator does in train mode; under jit with a sharded batch the statistics are
over the global batch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

_CONV_INIT = nn.initializers.normal(0.02)
_LEAK = 0.2


def _bn_scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _conv(features: int, stride: int, use_bias: bool, name: str, dtype) -> nn.Conv:
    return nn.Conv(
        features,
        (4, 4),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            _CONV_INIT, ("kernel_h", "kernel_w", "fan_in", "fan_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("fan_out",)),
        name=name,
    )


def _batch_norm(name: str, train: bool) -> nn.BatchNorm:
    # torch BatchNorm2d: eps 1e-5, running stats updated with momentum 0.1 (flax: 0.9)
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(_bn_scale_init, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class NLayerDiscriminator(nn.Module):
    """Image [B, H, W, C] -> patch logits [B, h, w, 1] (fp32)."""

    n_layers: int = 3
    ndf: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC, *, train: bool = True):
        if self.n_layers < 1:
            raise ValueError(f"NLayerDiscriminator needs n_layers >= 1; got {self.n_layers}")
        if x_BHWC.ndim != 4:
            raise ValueError(f"expected an NHWC image batch [B, H, W, C]; got {x_BHWC.shape}")
        h = _conv(self.ndf, 2, True, "conv_0", self.dtype)(x_BHWC.astype(self.dtype))
        h = nn.leaky_relu(h, _LEAK)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = _conv(self.ndf * min(2**n, 8), stride, False, f"conv_{n}", self.dtype)(h)
            h = nn.leaky_relu(_batch_norm(f"norm_{n}", train)(h), _LEAK)
        return _conv(1, 1, True, "conv_out", self.dtype)(h).astype(jnp.float32)
