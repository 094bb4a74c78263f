"""Euler ancestral: an Euler step of the probability-flow ODE down to sigma_down, then fresh noise
up to sigma_next (k-diffusion ``sample_euler_ancestral``; the ancestral split of Ho et al. 2020's
reverse step with eta = 1, Song et al. 2021 "DDIM" eq. 16, written in sigma space).

With D(x; sigma) the denoised x0 and z ~ N(0, I) per step:

    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2),
    x_next = x + (sigma_down - sigma) (x - D) / sigma + sigma_up z.

Step for step the same as diffusers ``EulerAncestralDiscreteScheduler`` (which draws z in every
step, the last one included, where sigma_up = 0): the state is in sigma space, the network sees
x / sqrt(sigma^2 + 1) and float timesteps.
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
    noise=None,
    use_karras_sigmas: bool = False,
    init_noise: str = "sigma_max",
    first_step: int = 0,
    last_step: int | None = None,
    callback=None,
):
    """Run Euler ancestral from x_T (unit noise) over float ``timesteps``; returns x_0.

    Per-step noise comes from ``noise`` [N, *x_T.shape] or ``fold_in(rng, i)``; ``init_noise`` as
    in ``euler.sample``, and ``last_step``.
    """
    kind = canonical_prediction_type(prediction_type)
    t_N, sigma_N1 = sigmas.sampling_sigmas(
        schedule, timesteps, use_karras_sigmas=use_karras_sigmas, first_step=first_step,
        last_step=last_step,
    )
    x = sigmas.initial_sample(_common.check_x(x_T), sigma_N1, init_noise)
    N = t_N.shape[0]
    noise_N, draw = _common.step_noise_source(rng, noise, N, x, "euler_ancestral")

    def step(carry, inputs):
        (x,) = carry
        i, t, sigma, sigma_next, z = inputs
        output = denoise_fn(sigmas.scale_input(x, sigma), sigmas.batch_t(t, x))
        d = (x - sigmas.denoised(output, x, sigma, kind)) / sigma
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        return (x + d * (sigma_down - sigma) + draw(i, z) * sigma_up,)

    xs = (t_N, sigma_N1[:-1], sigma_N1[1:], noise_N)
    (x,) = _common.scan_steps(step, (x,), xs, N, callback)
    return x
