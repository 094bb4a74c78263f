"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6).

out = uncond + scale * (cond - uncond), with cond and uncond (the empty or negative prompt)
evaluated in ONE batched network call ([uncond; cond] along the batch, as CompVis ``DDIMSampler``
and diffusers' pipelines do). The combination is applied to the raw network output, whatever its
prediction type (CompVis combines eps or v the same way). scale == 1 skips the unconditional half.

Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
eqs. 15-16; diffusers' ``rescale_noise_cfg``) pulls the guided output's per-sample standard
deviation back towards the conditional one's, which keeps zero-terminal-SNR v-models from
over-exposing at high guidance:

    x_rescaled = x_cfg * std(x_cond) / std(x_cfg)
    x_final    = phi * x_rescaled + (1 - phi) * x_cfg

with std over all but the batch axis, Bessel-corrected as torch's ``std``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def guidance_combine(uncond, cond, scale) -> jax.Array:
    """uncond + scale * (cond - uncond), in fp32."""
    uncond = jnp.asarray(uncond, jnp.float32)
    return uncond + scale * (jnp.asarray(cond, jnp.float32) - uncond)


def rescale_guidance(guided, cond, rescale) -> jax.Array:
    """phi * guided * std(cond) / std(guided) + (1 - phi) * guided, std per sample (fp32).

    A zero ``rescale`` (Python or traced) returns ``guided`` exactly, also where std(guided) is 0.
    """
    guided = jnp.asarray(guided, jnp.float32)
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(jnp.asarray(cond, jnp.float32), axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / jnp.where(std_guided > 0, std_guided, 1.0))
    mixed = rescale * rescaled + (1 - rescale) * guided
    return jnp.where(rescale > 0, mixed, guided)


def classifier_free_guidance(
    apply_fn: Callable, cond, uncond=None, scale: float = 7.5, rescale: float = 0.0
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Turn ``apply_fn(x_t, t_B, conditioning) -> output`` into a ``denoise_fn(x_t, t_B)``.

    ``cond``/``uncond`` are conditioning pytrees (e.g. a context array [B, L, D], or a dict of them)
    whose leaves have batch size B. Build the wrapper inside the caller's jitted function so the
    conditioning arrays are traced arguments, not baked-in constants. A Python ``scale`` of exactly
    1 calls the network on ``cond`` alone; any other scale (Python number or traced scalar) needs
    ``uncond``. ``rescale`` (Python or traced, 0 = off) applies ``rescale_guidance``.
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
        guided = guidance_combine(out_uncond, out_cond, scale)
        if isinstance(rescale, int | float) and float(rescale) == 0.0:
            return guided
        return rescale_guidance(guided, out_cond, rescale)

    return denoise
