"""Euler: the first-order solver of the probability-flow ODE in sigma space (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 1 without the 2nd
order correction; k-diffusion ``sample_euler``).

With D(x; sigma) the denoised x0 (see ``sigmas.denoised``) and d = (x - D) / sigma:

    x_next = x + (sigma_next - sigma) d.

Step for step the same as diffusers ``EulerDiscreteScheduler`` (``s_churn=0``,
``interpolation_type="linear"``, ``final_sigmas_type="zero"``, optionally
``use_karras_sigmas=True``): the sampler state lives in sigma space (x_T scaled by
``init_noise_sigma``), the network sees x / sqrt(sigma^2 + 1) and float timesteps.
"""

from __future__ import annotations

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
    """Run Euler from x_T (unit noise) over float ``timesteps`` (decreasing); returns x_0.

    ``init_noise``: "sigma_max" (diffusers' linspace/trailing spacing) or "vp" (leading), see
    ``sigmas.initial_sample``. ``last_step`` (exclusive) stops early, at that step's sigma
    (``sigmas.sampling_sigmas``). rng is unused (deterministic).
    """
    del rng
    kind = canonical_prediction_type(prediction_type)
    t_N, sigma_N1 = sigmas.sampling_sigmas(
        schedule, timesteps, use_karras_sigmas=use_karras_sigmas, first_step=first_step,
        last_step=last_step,
    )
    x = sigmas.initial_sample(_common.check_x(x_T), sigma_N1, init_noise)

    def step(carry, inputs):
        (x,) = carry
        _, t, sigma, sigma_next = inputs
        output = denoise_fn(sigmas.scale_input(x, sigma), sigmas.batch_t(t, x))
        d = (x - sigmas.denoised(output, x, sigma, kind)) / sigma
        return (x + d * (sigma_next - sigma),)

    xs = (t_N, sigma_N1[:-1], sigma_N1[1:])
    (x,) = _common.scan_steps(step, (x,), xs, t_N.shape[0], callback)
    return x
