"""DDPM ancestral sampler (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2).

Each step samples the posterior q(x_prev | x_t, x0_pred) (eq. 6-7) with the "fixed_small" variance
(1 - abar_prev) / (1 - abar_t) beta_t, beta_t = 1 - abar_t / abar_prev, clamped at 1e-20, and no
noise at t = 0 -- step for step the same as diffusers ``DDPMScheduler.step`` (previous = next entry
of the list, -1 after the last, i.e. the default ``prev_timesteps``).
"""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.diffusion import _common
from ldm_jax.diffusion.parameterization import canonical_prediction_type, to_x0


def sample(
    denoise_fn,
    x_T,
    schedule,
    timesteps,
    *,
    prediction_type: str = "epsilon",
    rng=None,
    prev_timesteps=None,
    noise=None,
    clip_x0: float | None = None,
    callback=None,
):
    """Run DDPM from x_T over ``timesteps`` (decreasing); returns x_0 (fp32).

    Needs ``rng`` or precomputed per-step ``noise`` [N, *x_T.shape]. ``clip_x0`` clips x0_pred to
    [-clip_x0, clip_x0] (diffusers ``clip_sample``).
    """
    kind = canonical_prediction_type(prediction_type)
    x = _common.check_x(x_T)
    t_N, prev_N = _common.as_timesteps(timesteps, prev_timesteps)
    N = t_N.shape[0]
    noise_N, draw = _common.step_noise_source(rng, noise, N, x, "DDPM")

    def step(carry, inputs):
        (x,) = carry
        i, t, t_prev, n = inputs
        a_t, a_prev = _common.abar(schedule, t), _common.abar(schedule, t_prev)
        beta_t = 1.0 - a_t / a_prev
        out = denoise_fn(x, _common.batch_t(t, x))
        x0 = to_x0(out, x, jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t), kind)
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        x0_coeff = jnp.sqrt(a_prev) * beta_t / (1.0 - a_t)
        x_coeff = jnp.sqrt(a_t / a_prev) * (1.0 - a_prev) / (1.0 - a_t)
        mean = x0_coeff * x0 + x_coeff * x
        variance = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
        std = jnp.where(t > 0, jnp.sqrt(variance), 0.0)
        return (mean + std * draw(i, n),)

    (x,) = _common.scan_steps(step, (x,), (t_N, prev_N, noise_N), N, callback)
    return x
