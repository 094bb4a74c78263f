"""UniPC-2 (B2(h), data prediction): the unified predictor-corrector of Zhao et al. 2023, "UniPC: A
Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", Algorithms 1-2 with
p = 2 and B(h) = e^{h} - 1 in the exponent's sign convention of the data-prediction form.

With lambda = log(alpha / sigma), m_i the x0 prediction at the i-th sample, h = lambda_{i+1} -
lambda_i, phi = e^{-h} - 1 and r = (lambda_{i-1} - lambda_i) / h:

    UniP-2 (predictor):  x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} phi m_i
                                   - alpha_{i+1} phi (1/2) (m_{i-1} - m_i) / r,
    UniC (corrector, once m_{i+1} is known at the predicted x_{i+1}):  redo the step from x_i with
        rho-weighted differences (m_{i+1} - m_i) and (m_{i-1} - m_i) / r, the rho solving the
        order conditions R rho = b (b_k from phi_k(h), eq. 8); the corrected x_{i+1} is the base
        of the next predictor, while m_{i+1} stays the one evaluated at the uncorrected sample.

The first and the final predictor steps are first order (DDIM in lambda; ``lower_order_final``), so
the corrector after step 0 has order 1 (rho = 1/2), later ones order 2. A run from ``first_step``
(diffusers' ``set_begin_index``) starts without history: no corrector at its first step, a
first-order predictor; one stopped at ``last_step`` returns its last predictor's (uncorrected)
sample, as diffusers' scheduler does when the SDXL pipeline stops calling it.

Step for step the same as diffusers ``UniPCMultistepScheduler()`` defaults (solver_order=2,
solver_type="bh2", predict_x0=True, lower_order_final=True, no disabled corrector); sigmas,
timesteps and ``use_karras_sigmas`` as ``dpm_solver`` (diffusers' UniPC lists equal
DPMSolverMultistep's).
"""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.diffusion import _common
from ldm_jax.diffusion.dpm_solver import alpha_sigma_lambda, final_step, step_sigmas
from ldm_jax.diffusion.parameterization import canonical_prediction_type, to_x0


def _update(x, m0, alpha_t, sigma_t, sigma_s, h, correction):
    """x_t = (sigma_t / sigma_s) x - alpha_t phi m0 - alpha_t B(h) correction, B(h) = phi."""
    phi = jnp.expm1(-h)
    return sigma_t / sigma_s * x - alpha_t * phi * m0 - alpha_t * phi * correction


def _rho_order2(h, r):
    """UniC-2 weights: solve [[1, 1], [r, 1]] rho = (b_1, b_2) (diffusers' R, b with hh = -h)."""
    hh = -h
    b_h = jnp.expm1(hh)
    phi_k = b_h / hh - 1.0
    b1 = phi_k / b_h
    b2 = (phi_k / hh - 0.5) * 2.0 / b_h
    rho0 = (b1 - b2) / (1.0 - r)
    return rho0, b1 - rho0


def sample(
    denoise_fn,
    x_T,
    schedule,
    timesteps,
    *,
    prediction_type: str = "epsilon",
    rng=None,
    prev_timesteps=None,
    use_karras_sigmas: bool = False,
    first_step: int = 0,
    last_step: int | None = None,
    callback=None,
):
    """Run UniPC-2 (bh2, predict_x0) from x_T over ``timesteps`` (decreasing); returns x_0, or
    with ``last_step`` (exclusive) the predicted x at that step's noise level."""
    del rng  # deterministic
    kind = canonical_prediction_type(prediction_type)
    x = _common.check_x(x_T)
    t_N, sigma_N, next_N = step_sigmas(
        schedule, timesteps, prev_timesteps, use_karras_sigmas, first_step, last_step
    )
    N = t_N.shape[0]
    final = final_step(timesteps, first_step, last_step)  # lower_order_final's step (or N)
    before_N = jnp.concatenate([sigma_N[:1], sigma_N[:-1]])  # sigma_{i-1}
    before2_N = jnp.concatenate([sigma_N[:2], sigma_N[:-2]])[:N]  # sigma_{i-2}

    def step(carry, inputs):
        x, x_last, m_last, m_last2 = carry  # uncorrected x_i, corrected x_{i-1}, m_{i-1}, m_{i-2}
        i, t, sigma_vp, next_vp, before_vp, before2_vp = inputs
        alpha_i, sigma_i, lambda_i = alpha_sigma_lambda(sigma_vp)
        alpha_n, sigma_n, lambda_n = alpha_sigma_lambda(next_vp)
        _, sigma_b, lambda_b = alpha_sigma_lambda(before_vp)
        _, _, lambda_b2 = alpha_sigma_lambda(before2_vp)
        m = to_x0(denoise_fn(x, _common.batch_t(t, x)), x, alpha_i, sigma_i, kind)

        # UniC: correct x_i, redoing step i-1 from x_{i-1} with m_i (order 1 after step 0)
        h_c = lambda_i - lambda_b
        r_c = (lambda_b2 - lambda_b) / h_c
        rho0, rho1 = _rho_order2(h_c, r_c)
        d_prev = jnp.where(i >= 2, (m_last2 - m_last) / jnp.where(i >= 2, r_c, 1.0), 0.0)
        corr = jnp.where(i >= 2, rho0 * d_prev + rho1 * (m - m_last), 0.5 * (m - m_last))
        x_corrected = _update(x_last, m_last, alpha_i, sigma_i, sigma_b, h_c, corr)
        x = jnp.where(i > 0, x_corrected, x)

        # UniP: predict x_{i+1} (order 2 except the first and the final step)
        h = lambda_n - lambda_i
        second_order = (i > 0) & (i != final)
        r = (lambda_b - lambda_i) / jnp.where(second_order, h, 1.0)
        pred = jnp.where(second_order, 0.5 * (m_last - m) / jnp.where(second_order, r, 1.0), 0.0)
        x_next = _update(x, m, alpha_n, sigma_n, sigma_i, h, pred)
        return x_next, x, m, m_last

    zeros = jnp.zeros_like(x)
    carry = (x, zeros, zeros, zeros)
    xs = (t_N, sigma_N, next_N, before_N, before2_N)
    x, _, _, _ = _common.scan_steps(step, carry, xs, N, callback)
    return x
