"""DPM-Solver++(2M): the multistep second-order solver of Lu et al. 2022, "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2 (data prediction form,
midpoint variant).

With lambda = log(alpha / sigma), h = lambda_next - lambda_cur and r = h_prev / h:

    x_next = (sigma_next / sigma_cur) x - alpha_next (e^{-h} - 1) (D0 + D1 / 2),
    D0 = x0_cur, D1 = (x0_cur - x0_prev) / r.

The first step and the final step (to sigma = 0, clean data) are first order (DDIM in lambda), as
diffusers' default ``lower_order_final`` with ``final_sigmas_type="zero"`` does.

Step for step the same as diffusers ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2)``: alpha and sigma are derived like diffusers from sigma_VP = sqrt((1 - abar) /
abar), alpha = 1 / sqrt(sigma_VP^2 + 1), sigma = sigma_VP alpha; previous = next entry, clean data
after the last (the default ``prev_timesteps``). diffusers' own "linspace"/"leading" lists for this
scheduler differ from DDIM's (they drop the last of N + 1 points): pass them as an array for parity.
"""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.diffusion import _common
from ldm_jax.diffusion.parameterization import canonical_prediction_type, to_x0


def _alpha_sigma_lambda(schedule, t):
    a = _common.abar(schedule, t)
    sigma_vp = jnp.sqrt((1.0 - a) / a)
    alpha = 1.0 / jnp.sqrt(sigma_vp**2 + 1.0)
    sigma = sigma_vp * alpha
    return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


def sample(
    denoise_fn,
    x_T,
    schedule,
    timesteps,
    *,
    prediction_type: str = "epsilon",
    rng=None,
    prev_timesteps=None,
    callback=None,
):
    """Run DPM-Solver++(2M) from x_T over ``timesteps`` (decreasing); returns x_0 (rng unused)."""
    del rng  # deterministic
    kind = canonical_prediction_type(prediction_type)
    x = _common.check_x(x_T)
    t_N, prev_N = _common.as_timesteps(timesteps, prev_timesteps)
    N = t_N.shape[0]
    before_N = jnp.concatenate([t_N[:1], t_N[:-1]])  # the timestep of the previous step (x0_prev)

    def step(carry, inputs):
        x, x0_prev = carry
        i, t, t_next, t_before = inputs
        alpha_s, sigma_s, lambda_s = _alpha_sigma_lambda(schedule, t)
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(schedule, t_next)
        _, _, lambda_b = _alpha_sigma_lambda(schedule, t_before)
        x0 = to_x0(denoise_fn(x, _common.batch_t(t, x)), x, alpha_s, sigma_s, kind)
        second_order = (i > 0) & (i < N - 1)
        h = lambda_t - lambda_s
        r = jnp.where(second_order, (lambda_s - lambda_b) / jnp.where(second_order, h, 1.0), 1.0)
        d1 = jnp.where(second_order, (1.0 / r) * (x0 - x0_prev), 0.0)
        coeff = alpha_t * (jnp.exp(-h) - 1.0)
        x_next = (sigma_t / sigma_s) * x - coeff * x0 - 0.5 * coeff * d1
        return x_next, x0

    carry = (x, jnp.zeros_like(x))
    x, _ = _common.scan_steps(step, carry, (t_N, prev_N, before_N), N, callback)
    return x
