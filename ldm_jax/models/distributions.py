"""The posterior of the KL autoencoder, as CompVis `ldm/modules/distributions/distributions.py`
(DiagonalGaussianDistribution), with NHWC moments split on the channel axis.

A `flax.struct` dataclass, so a posterior can be returned from (and passed into) jitted functions.
"""

import math

import flax
import jax
import jax.numpy as jnp

_SUM_AXES = (1, 2, 3)


@flax.struct.dataclass
class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element; statistics are kept in fp32."""

    mean: jax.Array
    logvar: jax.Array
    # CompVis' deterministic posterior: zero variance, KL and NLL reported as 0.
    deterministic: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def from_moments(cls, moments_BHWC: jax.Array, deterministic: bool = False):
        """Split [..., 2C] into mean and log-variance; clamp logvar to [-30, 20] as CompVis."""
        mean, logvar = jnp.split(moments_BHWC.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0), deterministic)

    @property
    def std(self) -> jax.Array:
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """mean + std * eps, eps ~ N(0, I) drawn from `rng`."""
        eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other) per example, summed over H, W, C; `other=None` means N(0, I)."""
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], jnp.float32)
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=_SUM_AXES)

    def nll(self, sample: jax.Array, axes: tuple[int, ...] = _SUM_AXES) -> jax.Array:
        """Negative log-likelihood of `sample` under this Gaussian, summed over `axes`."""
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], jnp.float32)
        terms = math.log(2.0 * math.pi) + self.logvar + jnp.square(sample - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=axes)
