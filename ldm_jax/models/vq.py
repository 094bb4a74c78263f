"""The VQ-regularised perceptual autoencoder of Latent Diffusion.

Mirrors CompVis `ldm/models/autoencoder.py` VQModel / VQModelInterface (the interface the LDM uses:
`encode` returns the latents BEFORE quantisation, `decode` quantises them) and taming's
VectorQuantizer2 with `legacy=True` (diffusers `VQModel` / `VectorQuantizer` compute the same).
"""

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import AutoencoderConfig, Decoder, Encoder, check_latent
from ldm_jax.models.layers import Dtype, conv, embedding


@dataclasses.dataclass(frozen=True)
class VQConfig(AutoencoderConfig):
    """AutoencoderConfig (double_z=False) plus the codebook: n_embed vectors of embed_dim."""

    double_z: bool = False
    n_embed: int = 16384
    beta: float = 0.25  # weight of the commitment-side term of the codebook loss

    def __post_init__(self):
        super().__post_init__()
        if self.double_z:
            raise ValueError(
                "a VQ autoencoder's encoder outputs latents only: double_z must be False"
            )
        if self.n_embed < 1:
            raise ValueError(f"n_embed must be a positive codebook size; got {self.n_embed}")


class Quantized(NamedTuple):
    """Result of `VectorQuantizer`: a tuple (z_q, loss, indices, perplexity)."""

    z_q: jax.Array  # [B, h, w, embed_dim], straight-through: forward = codebook vectors
    loss: jax.Array  # scalar codebook loss
    indices: jax.Array  # [B, h, w] int32 codebook indices
    perplexity: jax.Array  # scalar exp(entropy of the batch's code usage)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with the straight-through estimator (VectorQuantizer2).

    The distances, the codebook and the loss are computed in fp32 whatever the network dtype.
    """

    n_embed: int
    embed_dim: int
    beta: float = 0.25

    def setup(self):
        # taming's VectorQuantizer2 initialises the codebook uniformly in +-1/n_embed.
        bound = 1.0 / self.n_embed
        self.codebook = embedding(
            self.n_embed,
            self.embed_dim,
            name="codebook",
            init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
        )

    def __call__(self, z_BHWC) -> Quantized:
        check_latent(z_BHWC, self.embed_dim)
        z = z_BHWC.astype(jnp.float32)
        codes_ND = self.codebook.embedding
        z_MD = z.reshape(-1, self.embed_dim)
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e; HIGHEST precision so TPU/GPU matmuls (bf16 passes,
        # TF32) pick the same codes as an exact fp32 computation.
        cross_MN = jnp.matmul(z_MD, codes_ND.T, precision=jax.lax.Precision.HIGHEST)
        dist_MN = (
            jnp.sum(jnp.square(z_MD), axis=1, keepdims=True)
            + jnp.sum(jnp.square(codes_ND), axis=1)
            - 2.0 * cross_MN
        )
        indices_M = jnp.argmin(dist_MN, axis=1).astype(jnp.int32)
        z_q = jnp.take(codes_ND, indices_M, axis=0).reshape(z.shape)
        sg = jax.lax.stop_gradient
        # legacy (buggy but published) weighting: beta multiplies the codebook-side term.
        loss = jnp.mean(jnp.square(sg(z_q) - z)) + self.beta * jnp.mean(jnp.square(z_q - sg(z)))
        usage_N = jnp.bincount(indices_M, length=self.n_embed) / indices_M.shape[0]
        perplexity = jnp.exp(-jnp.sum(usage_N * jnp.log(usage_N + 1e-10)))
        z_q = z + sg(z_q - z)
        return Quantized(z_q, loss, indices_M.reshape(z.shape[:-1]), perplexity)

    def lookup(self, indices_BHW) -> jax.Array:
        """Codebook vectors [B, h, w, embed_dim] for integer indices [B, h, w]."""
        if indices_BHW.ndim != 3 or not jnp.issubdtype(indices_BHW.dtype, jnp.integer):
            raise ValueError(
                f"expected integer codebook indices [B, h, w]; got {indices_BHW.dtype} "
                f"{indices_BHW.shape}"
            )
        return jnp.take(self.codebook.embedding, indices_BHW, axis=0)


class VQModel(nn.Module):
    """encoder -> quant_conv (pre-quantisation latents); quantize -> post_quant_conv -> decoder.

    Methods for `model.apply(variables, ..., method=...)`: "encode", "quantize", "decode",
    "decode_indices"; `__call__` returns (reconstruction, Quantized).
    """

    config: VQConfig
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        if not isinstance(cfg, VQConfig):
            raise ValueError(f"VQModel needs a VQConfig (with n_embed); got {type(cfg).__name__}")
        kwargs = dict(attention_implementation=self.attention_implementation, dtype=self.dtype)
        self.encoder = Encoder(cfg, **kwargs)
        self.quant_conv = conv(cfg.embed_dim, 1, name="quant_conv", dtype=self.dtype)
        # `quantize` is also a method name, so the attribute differs from the parameter name.
        self.quantizer = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, name="quantize")
        self.post_quant_conv = conv(cfg.z_channels, 1, name="post_quant_conv", dtype=self.dtype)
        self.decoder = Decoder(cfg, **kwargs)

    def encode(self, x_BHWC, *, deterministic: bool = True) -> jax.Array:
        """Image -> latents [B, h, w, embed_dim] before quantisation (what the LDM diffuses)."""
        return self.quant_conv(self.encoder(x_BHWC, deterministic=deterministic))

    def quantize(self, h_BHWC) -> Quantized:
        return self.quantizer(h_BHWC)

    def decode(self, h_BHWC, force_not_quantize: bool = False, *, deterministic: bool = True):
        """Latents -> image; quantised first unless `force_not_quantize`."""
        check_latent(h_BHWC, self.config.embed_dim)
        z_q = h_BHWC if force_not_quantize else self.quantizer(h_BHWC).z_q
        return self.decoder(self.post_quant_conv(z_q), deterministic=deterministic)

    def decode_indices(self, indices_BHW, *, deterministic: bool = True):
        """Codebook indices [B, h, w] -> image."""
        z_q = self.quantizer.lookup(indices_BHW)
        return self.decode(z_q, force_not_quantize=True, deterministic=deterministic)

    def __call__(self, x_BHWC, *, deterministic: bool = True):
        quantized = self.quantizer(self.encode(x_BHWC, deterministic=deterministic))
        z = self.post_quant_conv(quantized.z_q)
        return self.decoder(z, deterministic=deterministic), quantized
