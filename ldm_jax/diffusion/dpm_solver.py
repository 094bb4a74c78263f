"""DPM-Solver++(2M): the multistep second-order solver of Lu et al. 2022, "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2 (data prediction form,
midpoint variant).

With lambda = log(alpha / sigma), h = lambda_next - lambda_cur and r = h_prev / h:

    x_next = (sigma_next / sigma_cur) x - alpha_next (e^{-h} - 1) (D0 + D1 / 2),
    D0 = x0_cur, D1 = (x0_cur - x0_prev) / r.

The first step and the final step (to sigma = 0, clean data) are first order (DDIM in lambda), as
diffusers' default ``lower_order_final`` with ``final_sigmas_type="zero"`` does. A run that starts
at ``first_step`` (diffusers' ``set_begin_index``: image-to-image, SDXL's ``denoising_start``) has
no history, so its first step is first order too; one that stops at ``last_step`` (SDXL's
``denoising_end``) ends with a second-order step, as the final one is not among its steps.

Step for step the same as diffusers ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2)``: alpha and sigma are derived like diffusers from sigma_VP = sqrt((1 - abar) /
abar), alpha = 1 / sqrt(sigma_VP^2 + 1), sigma = sigma_VP alpha; previous = next entry, clean data
after the last (the default ``prev_timesteps``). diffusers' own "linspace"/"leading" lists for this
scheduler differ from DDIM's (they drop the last of N + 1 points): pass them as an array for parity.

``use_karras_sigmas=True`` (diffusers' ``use_karras_sigmas``) steps through N = len(timesteps)
Karras sigmas (rho = 7, ``sigmas.karras_sigmas``) instead; the model sees each sigma's timestep
rounded to an integer (diffusers rounds them too) and the solver uses the Karras sigma itself.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import _common, sigmas
from ldm_jax.diffusion.parameterization import canonical_prediction_type, to_x0


def alpha_sigma_lambda(sigma_vp):
    """(alpha, sigma, lambda) of the VP process at VE noise level sigma_vp (lambda = inf at 0)."""
    alpha = 1.0 / jnp.sqrt(sigma_vp**2 + 1.0)
    sigma = sigma_vp * alpha
    return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


def step_sigmas(schedule, timesteps, prev_timesteps=None, use_karras_sigmas=False, first_step=0,
                last_step=None):  # fmt: skip
    """(t_N, sigma_N, next_N): the model's int32 timestep, and the VE sigma of each step and of its
    target (0 = clean data); the solver's view of diffusers' ``timesteps`` / ``sigmas``, from
    ``first_step`` on (image-to-image; Karras sigmas are made for all N steps first), up to
    ``last_step`` (exclusive; None: all; the last step then targets that step's sigma)."""
    t_N, prev_N = _common.as_timesteps(timesteps, prev_timesteps)
    last = check_step_window(first_step, last_step, t_N.shape[0])
    t_N, sigma_N, next_N = _all_step_sigmas(schedule, t_N, prev_N, prev_timesteps,
                                            use_karras_sigmas)
    return t_N[first_step:last], sigma_N[first_step:last], next_N[first_step:last]


def check_step_window(first_step: int, last_step: int | None, num_steps: int) -> int:
    """The static window [first_step, last) of the N steps (last = N for None); ValueError."""
    sigmas.check_first_step(first_step, num_steps)
    last = num_steps if last_step is None else last_step
    if not isinstance(last, int) or not first_step < last <= num_steps:
        raise ValueError(
            f"last_step must be an int in [{first_step + 1}, {num_steps}], got {last_step!r}"
        )
    return last


def final_step(timesteps, first_step: int, last_step: int | None) -> int:
    """The index, within the window's steps, of the schedule's final step, which
    ``lower_order_final`` takes at first order; the window's length when the window stops
    before it (``last_step``: diffusers' order rule looks at all N steps, not the ones run)."""
    num_steps = np.shape(timesteps)[0]
    last = check_step_window(first_step, last_step, num_steps)
    return last - first_step - (1 if last == num_steps else 0)


def _all_step_sigmas(schedule, t_N, prev_N, prev_timesteps, use_karras_sigmas):
    if use_karras_sigmas:
        if prev_timesteps is not None:
            raise ValueError("prev_timesteps cannot be combined with use_karras_sigmas")
        sigmas_T = sigmas.schedule_sigmas(schedule)
        sigma_N = sigmas.karras_sigmas(sigmas_T[-1], sigmas_T[0], t_N.shape[0])
        t_N = jnp.round(sigmas.sigma_to_t(sigma_N, jnp.log(sigmas_T))).astype(jnp.int32)
        next_N = jnp.concatenate([sigma_N[1:], jnp.zeros((1,), jnp.float32)])
        return t_N, sigma_N, next_N

    def ve_sigma(t):
        a = _common.abar(schedule, t)
        return jnp.sqrt((1.0 - a) / a)

    return t_N, ve_sigma(t_N), ve_sigma(prev_N)


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
    """Run DPM-Solver++(2M) from x_T over ``timesteps`` (decreasing) from ``first_step`` on;
    returns x_0, or with ``last_step`` (exclusive) x at that step's noise level (rng unused)."""
    del rng  # deterministic
    kind = canonical_prediction_type(prediction_type)
    x = _common.check_x(x_T)
    t_N, sigma_N, next_N = step_sigmas(
        schedule, timesteps, prev_timesteps, use_karras_sigmas, first_step, last_step
    )
    N = t_N.shape[0]
    final = final_step(timesteps, first_step, last_step)
    before_N = jnp.concatenate([sigma_N[:1], sigma_N[:-1]])  # the sigma of x0_prev

    def step(carry, inputs):
        x, x0_prev = carry
        i, t, sigma_vp, next_vp, before_vp = inputs
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(sigma_vp)
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(next_vp)
        _, _, lambda_b = alpha_sigma_lambda(before_vp)
        x0 = to_x0(denoise_fn(x, _common.batch_t(t, x)), x, alpha_s, sigma_s, kind)
        second_order = (i > 0) & (i != final)
        h = lambda_t - lambda_s
        r = jnp.where(second_order, (lambda_s - lambda_b) / jnp.where(second_order, h, 1.0), 1.0)
        d1 = jnp.where(second_order, (1.0 / r) * (x0 - x0_prev), 0.0)
        coeff = alpha_t * (jnp.exp(-h) - 1.0)
        x_next = (sigma_t / sigma_s) * x - coeff * x0 - 0.5 * coeff * d1
        return x_next, x0

    carry = (x, jnp.zeros_like(x))
    x, _ = _common.scan_steps(step, carry, (t_N, sigma_N, next_N, before_N), N, callback)
    return x
