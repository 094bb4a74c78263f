"""PLMS sampler: the pseudo linear multistep method of Liu et al. 2022, "Pseudo Numerical Methods
for Diffusion Models on Manifolds" (PNDM), eq. 12 with the transfer function phi of eq. 11.

This is CompVis ``PLMSSampler`` and diffusers ``PNDMScheduler(skip_prk_steps=True)``: the first step
is an Euler step followed by a Heun-like correction (the model is evaluated again at the next
timestep and the two eps are averaged, re-stepping from the same sample: N + 1 evaluations for
N >= 2 steps); later steps use the 2nd/3rd/4th-order Adams-Bashforth combinations of the eps
history.

PLMS needs eps predictions. A v- or x0-model raises ValueError; wrap it with
``parameterization.as_epsilon_fn`` to convert each evaluation to eps (diffusers' PNDMScheduler
instead combines raw v outputs and converts the combination, which is not the same method).

Step for step the same as diffusers with "leading" spacing and
``prev_timesteps=strided_previous_timesteps(t, T, final=0)`` (PNDMScheduler's
``set_alpha_to_one=False``), and as CompVis with "uniform" spacing and
``previous_timesteps(t, final=0)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import _common
from ldm_jax.diffusion.parameterization import canonical_prediction_type

# Adams-Bashforth coefficients for 1..4 stored eps, oldest first (the history is kept newest last).
# A numpy constant: a jnp array here would initialise a JAX backend at import time.
_AB_COEFFS = np.array(
    [
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, -1.0 / 2, 3.0 / 2],
        [0.0, 5.0 / 12, -16.0 / 12, 23.0 / 12],
        [-9.0 / 24, 37.0 / 24, -59.0 / 24, 55.0 / 24],
    ],
    np.float32,
)


def _transfer(x, eps, a_t, a_prev):
    """PNDM's phi(x_t, eps, t -> t_prev) (Liu et al. eq. 11; diffusers ``_get_prev_sample``)."""
    denom = a_t * jnp.sqrt(1.0 - a_prev) + jnp.sqrt(a_t * (1.0 - a_t) * a_prev)
    return jnp.sqrt(a_prev / a_t) * x - (a_prev - a_t) * eps / denom


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
    """Run PLMS from x_T over ``timesteps`` (decreasing); returns x_0 (fp32). ``rng`` is unused.

    ``callback(i, x)`` sees N + 1 iterations for N >= 2 (iteration 0 is the Euler predictor).
    """
    del rng  # deterministic
    if canonical_prediction_type(prediction_type) != "epsilon":
        raise ValueError(
            f"PLMS needs eps predictions, got prediction_type={prediction_type!r}; wrap the "
            "model with ldm_jax.diffusion.parameterization.as_epsilon_fn(denoise_fn, schedule, "
            "prediction_type)"
        )
    x = _common.check_x(x_T)
    t_N, prev_N = _common.as_timesteps(timesteps, prev_timesteps)
    N = t_N.shape[0]
    if N == 1:
        eval_t, from_t, to_t = t_N, t_N, prev_N
    else:  # iteration 1 evaluates at t_1 and corrects the step t_0 -> prev_0, then t_1 is run again
        eval_t = jnp.concatenate([t_N[:2], t_N[1:]])
        from_t = jnp.concatenate([t_N[:1], t_N])
        to_t = jnp.concatenate([prev_N[:1], prev_N])
    M = eval_t.shape[0]

    def step(carry, inputs):
        x, x_saved, ets, count = carry
        i, t_eval, t_from, t_to = inputs
        e = denoise_fn(x, _common.batch_t(t_eval, x)).astype(jnp.float32)
        correction = i == 1
        pushed = jnp.concatenate([ets[1:], e[None]])
        new_count = jnp.minimum(count + 1, 4)
        coeffs = jnp.asarray(_AB_COEFFS)[new_count - 1].reshape((4,) + (1,) * x.ndim)
        eps = jnp.where(correction, 0.5 * (e + ets[-1]), jnp.sum(coeffs * pushed, axis=0))
        start = jnp.where(correction, x_saved, x)
        a_from, a_to = _common.abar(schedule, t_from), _common.abar(schedule, t_to)
        x_next = _transfer(start, eps, a_from, a_to)
        ets = jnp.where(correction, ets, pushed)
        count = jnp.where(correction, count, new_count)
        return x_next, x, ets, count

    carry = (x, x, jnp.zeros((4,) + x.shape, jnp.float32), jnp.int32(0))
    x, *_ = _common.scan_steps(step, carry, (eval_t, from_t, to_t), M, callback)
    return x
