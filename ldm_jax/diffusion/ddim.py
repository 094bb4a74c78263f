"""DDIM sampler (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12).

    x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - s_t^2) eps_pred + s_t z,
    s_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))   (eq. 16).

eta = 0 is deterministic DDIM, eta = 1 the DDPM posterior variance. Step for step the same as
diffusers ``DDIMScheduler.step`` (which steps to ``t - T // N``: pass
``strided_previous_timesteps``) and CompVis ``DDIMSampler`` (previous = next entry, abar_0 after
the last: ``previous_timesteps(t, final=0)``).
"""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.diffusion import _common
from ldm_jax.diffusion.parameterization import canonical_prediction_type, to_x0_eps


def sample(
    denoise_fn,
    x_T,
    schedule,
    timesteps,
    *,
    prediction_type: str = "epsilon",
    rng=None,
    eta: float = 0.0,
    prev_timesteps=None,
    noise=None,
    clip_x0: float | None = None,
    callback=None,
):
    """Run DDIM from x_T over ``timesteps`` (decreasing); returns x_0 (fp32).

    ``eta`` (a Python float) > 0 needs ``rng`` or precomputed ``noise`` [N, *x_T.shape].
    ``clip_x0`` clips x0_pred to [-clip_x0, clip_x0] (diffusers ``clip_sample``; eps is kept).
    """
    kind = canonical_prediction_type(prediction_type)
    x = _common.check_x(x_T)
    t_N, prev_N = _common.as_timesteps(timesteps, prev_timesteps)
    N = t_N.shape[0]
    eta = float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0:
        noise_N, draw = _common.step_noise_source(rng, noise, N, x, "DDIM with eta > 0")
    else:
        noise_N, draw = jnp.zeros((N,), jnp.float32), None

    def step(carry, inputs):
        (x,) = carry
        i, t, t_prev, n = inputs
        a_t, a_prev = _common.abar(schedule, t), _common.abar(schedule, t_prev)
        out = denoise_fn(x, _common.batch_t(t, x))
        x0, eps = to_x0_eps(out, x, jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t), kind)
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = eta * jnp.sqrt(variance)
        x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std**2) * eps
        if draw is not None:
            x_prev = x_prev + std * draw(i, n)
        return (x_prev,)

    (x,) = _common.scan_steps(step, (x,), (t_N, prev_N, noise_N), N, callback)
    return x
