"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6).

out = uncond + scale * (cond - uncond), with cond and uncond (the empty or negative prompt)
evaluated in ONE batched network call ([uncond; cond] along the batch, as CompVis ``DDIMSampler``
and diffusers' pipelines do). The combination is applied to the raw network output, whatever its
prediction type (CompVis combines eps or v the same way). scale == 1 skips the unconditional half.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def guidance_combine(uncond, cond, scale) -> jax.Array:
    """uncond + scale * (cond - uncond), in fp32."""
    uncond = jnp.asarray(uncond, jnp.float32)
    return uncond + scale * (jnp.asarray(cond, jnp.float32) - uncond)


def classifier_free_guidance(
    apply_fn: Callable, cond, uncond=None, scale: float = 7.5
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Turn ``apply_fn(x_t, t_B, conditioning) -> output`` into a ``denoise_fn(x_t, t_B)``.

    ``cond``/``uncond`` are conditioning pytrees (e.g. a context array [B, L, D], or a dict of them)
    whose leaves have batch size B. Build the wrapper inside the caller's jitted function so the
    conditioning arrays are traced arguments, not baked-in constants. A Python ``scale`` of exactly
    1 calls the network on ``cond`` alone; any other scale (Python number or traced scalar) needs
    ``uncond``.
    """
    skip_uncond = isinstance(scale, int | float) and float(scale) == 1.0
    if uncond is None and not skip_uncond:
        raise ValueError("classifier-free guidance with scale != 1 needs `uncond` conditioning")

    if skip_uncond:

        def denoise_cond(x_t, t_B):
            return apply_fn(x_t, t_B, cond)

        return denoise_cond

    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

    def denoise(x_t, t_B):
        out = apply_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t_B, t_B]), both)
        out_uncond, out_cond = jnp.split(out, 2, axis=0)
        return guidance_combine(out_uncond, out_cond, scale)

    return denoise
