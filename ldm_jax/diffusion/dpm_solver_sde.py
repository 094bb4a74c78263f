"""SDE-DPM-Solver++(2M): the stochastic multistep second-order solver of Lu et al. 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", sec. 5 / App. B
(data prediction form of the reverse SDE, midpoint variant; k-diffusion's ``sample_dpmpp_2m_sde``).

With lambda = log(alpha / sigma), h = lambda_next - lambda_cur, r = h_prev / h and z ~ N(0, I):

    x_next = (sigma_next / sigma_cur) e^{-h} x + alpha_next (1 - e^{-2h}) (D0 + D1 / 2)
             + sigma_next sqrt(1 - e^{-2h}) z,
    D0 = x0_cur, D1 = (x0_cur - x0_prev) / r.

The first and the final step (to sigma = 0, where the noise term vanishes) are first order (D1 = 0);
``first_step`` / ``last_step`` window the run as in ``dpm_solver`` (SDXL's hand-off).
Timesteps, sigmas and ``use_karras_sigmas`` are those of ``dpm_solver`` (``step_sigmas``); step for
step the same as diffusers ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
solver_order=2)`` given the same per-step noise (its ``step(..., variance_noise=z)``).
"""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.diffusion import _common
from ldm_jax.diffusion.dpm_solver import alpha_sigma_lambda, final_step, step_sigmas
from ldm_jax.diffusion.parameterization import canonical_prediction_type, to_x0


def sample(
    denoise_fn,
    x_T,
    schedule,
    timesteps,
    *,
    prediction_type: str = "epsilon",
    rng=None,
    noise=None,
    prev_timesteps=None,
    use_karras_sigmas: bool = False,
    first_step: int = 0,
    last_step: int | None = None,
    callback=None,
):
    """Run SDE-DPM-Solver++(2M) from x_T over ``timesteps`` (decreasing); returns x_0.

    ``noise`` [N, *x_T.shape] (one draw per step run, the final one's unused) replaces draws
    from ``rng``; ``last_step`` (exclusive) stops at that step's noise level.
    """
    kind = canonical_prediction_type(prediction_type)
    x = _common.check_x(x_T)
    t_N, sigma_N, next_N = step_sigmas(
        schedule, timesteps, prev_timesteps, use_karras_sigmas, first_step, last_step
    )
    N = t_N.shape[0]
    final = final_step(timesteps, first_step, last_step)  # lower_order_final's step (or N)
    before_N = jnp.concatenate([sigma_N[:1], sigma_N[:-1]])  # the sigma of x0_prev
    noise_N, draw = _common.step_noise_source(rng, noise, N, x, "dpm_solver_sde")

    def step(carry, inputs):
        x, x0_prev = carry
        i, t, sigma_vp, next_vp, before_vp, z = inputs
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(sigma_vp)
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(next_vp)
        _, _, lambda_b = alpha_sigma_lambda(before_vp)
        x0 = to_x0(denoise_fn(x, _common.batch_t(t, x)), x, alpha_s, sigma_s, kind)
        second_order = (i > 0) & (i != final)
        h = lambda_t - lambda_s
        r = jnp.where(second_order, (lambda_s - lambda_b) / jnp.where(second_order, h, 1.0), 1.0)
        d1 = jnp.where(second_order, (1.0 / r) * (x0 - x0_prev), 0.0)
        coeff = alpha_t * (1.0 - jnp.exp(-2.0 * h))
        x_next = (
            (sigma_t / sigma_s * jnp.exp(-h)) * x
            + coeff * x0
            + 0.5 * coeff * d1
            + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2.0 * h)) * draw(i, z)
        )
        return x_next, x0

    carry = (x, jnp.zeros_like(x))
    xs = (t_N, sigma_N, next_N, before_N, noise_N)
    x, _ = _common.scan_steps(step, carry, xs, N, callback)
    return x
