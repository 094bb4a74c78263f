"""Heun: the second-order (trapezoidal) solver of the probability-flow ODE in sigma space (Karras
et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 1 with
gamma = 0; k-diffusion ``sample_heun``).

With D(x; sigma) the denoised x0, d(x, sigma) = (x - D(x; sigma)) / sigma, h = sigma_next - sigma:

    x' = x + h d(x, sigma),
    x_next = x + h (d(x, sigma) + d(x', sigma_next)) / 2   (x_next = x' when sigma_next = 0),

two network calls per step except the last (2N - 1 in all). Step for step the same as diffusers
``HeunDiscreteScheduler`` (optionally ``use_karras_sigmas=True``), whose timestep list interleaves
the two evaluations ([t0, t1, t1, t2, t2, ...]); here one scan step does both (the second under
``lax.cond``, skipped on the last step). The callback sees x_next once per step.

``last_step`` (SDXL's ``denoising_end``) stops there with the last step's Euler predictor only, as
diffusers' pipeline does: its cut keeps the timesteps >= the cutoff, [t0, t1, t1, ..., t_k], which
ends on the first (Euler) half of step k.
"""

from __future__ import annotations

import jax

from ldm_jax.diffusion import _common, sigmas
from ldm_jax.diffusion.parameterization import canonical_prediction_type


def sample(
    denoise_fn,
    x_T,
    schedule,
    timesteps,
    *,
    prediction_type: str = "epsilon",
    rng=None,
    use_karras_sigmas: bool = False,
    init_noise: str = "sigma_max",
    first_step: int = 0,
    last_step: int | None = None,
    callback=None,
):
    """Run Heun from x_T (unit noise) over float ``timesteps`` (decreasing); returns x_0.

    ``init_noise`` as in ``euler.sample``; ``last_step`` (exclusive) stops at that step's sigma,
    the last step Euler only; rng is unused (deterministic).
    """
    del rng
    kind = canonical_prediction_type(prediction_type)
    t_N, sigma_N1 = sigmas.sampling_sigmas(
        schedule, timesteps, use_karras_sigmas=use_karras_sigmas, first_step=first_step,
        last_step=last_step,
    )
    x = sigmas.initial_sample(_common.check_x(x_T), sigma_N1, init_noise)
    N = t_N.shape[0]
    t_next_N = jax.numpy.concatenate([t_N[1:], t_N[-1:]])  # the last entry is never evaluated

    def derivative(x, t, sigma):
        output = denoise_fn(sigmas.scale_input(x, sigma), sigmas.batch_t(t, x))
        return (x - sigmas.denoised(output, x, sigma, kind)) / sigma

    def step(carry, inputs):
        (x,) = carry
        i, t, t_next, sigma, sigma_next = inputs
        d = derivative(x, t, sigma)
        dt = sigma_next - sigma
        x_euler = x + d * dt

        def heun(_):
            return x + (d + derivative(x_euler, t_next, sigma_next)) / 2 * dt

        return (jax.lax.cond(i < N - 1, heun, lambda _: x_euler, None),)

    xs = (t_N, t_next_N, sigma_N1[:-1], sigma_N1[1:])
    (x,) = _common.scan_steps(step, (x,), xs, N, callback)
    return x
