"""The conditional noise-prediction loss of LDM: E_t,eps ||target - net(z_t, t, c)||^2.

t ~ U{0..T-1}, z_t = q_sample(z_0, t, eps) and the target (eps, x0 or v) come from
ldm_jax.diffusion (no schedule math is duplicated here). As CompVis p_losses with the default
weights (l_simple_weight 1, no ELBO term, learn_logvar off) the loss is the plain mean squared
error.
Optional min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", eq. 10 and its eps/v forms) rebalances timesteps.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.parameterization import (
    alpha_sigma,
    canonical_prediction_type,
    from_x0_eps,
)
from ldm_jax.diffusion.schedules import NoiseSchedule, q_sample


def sample_timesteps(rng: jax.Array, batch: int, num_timesteps: int) -> jax.Array:
    """[batch] int32 timesteps uniform in [0, num_timesteps)."""
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)


def noisy_input_and_target(
    schedule: NoiseSchedule, x0, noise, t_B, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """(x_t, target): x_t ~ q(x_t | x0) and what a `prediction_type` network should output."""
    x_t = q_sample(schedule, x0, t_B, noise)
    alpha, sigma = alpha_sigma(schedule.alphas_cumprod[t_B])
    shape = (-1,) + (1,) * (x0.ndim - 1)
    target = from_x0_eps(x0, noise, alpha.reshape(shape), sigma.reshape(shape), prediction_type)
    return x_t, target


def min_snr_weights(schedule: NoiseSchedule, t_B, gamma: float, prediction_type: str) -> jax.Array:
    """Per-sample weights making the loss equal min(SNR, gamma) * ||x0 - x0_pred||^2.

    SNR = abar / (1 - abar). The x0 error is eps-error * SNR^-1 and v-error * (SNR + 1)^-1 away,
    so the weights are min(SNR, gamma) / SNR (eps), min(SNR, gamma) (x0), / (SNR + 1) (v).
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0; got {gamma}")
    abar = schedule.alphas_cumprod[t_B].astype(jnp.float32)
    snr = abar / (1.0 - abar)
    clipped = jnp.minimum(snr, jnp.float32(gamma))
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return clipped / snr
    if kind == "sample":
        return clipped
    return clipped / (snr + 1.0)


def diffusion_loss(
    apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: NoiseSchedule,
    x0_BHWC: jax.Array,
    rng: jax.Array,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
    weights_B: jax.Array | None = None,
) -> jax.Array:
    """Scalar loss mean_B(w_B * loss_B); apply_fn(x_t, t_B) is the conditioned network (output in
    any dtype); `weights_B` [B] default 1 (DreamBooth: instance and prior rows, ldm_jax/data)."""
    kind = canonical_prediction_type(prediction_type)
    t_rng, noise_rng = jax.random.split(rng)
    batch = x0_BHWC.shape[0]
    t_B = sample_timesteps(t_rng, batch, schedule.num_train_timesteps)
    noise = jax.random.normal(noise_rng, x0_BHWC.shape, jnp.float32)
    x_t, target = noisy_input_and_target(schedule, x0_BHWC.astype(jnp.float32), noise, t_B, kind)
    output = apply_fn(x_t, t_B).astype(jnp.float32)
    per_sample_B = jnp.mean(jnp.square(output - target), axis=tuple(range(1, x0_BHWC.ndim)))
    if min_snr_gamma:
        per_sample_B = per_sample_B * min_snr_weights(schedule, t_B, min_snr_gamma, kind)
    if weights_B is not None:
        per_sample_B = per_sample_B * jnp.asarray(weights_B, jnp.float32).reshape(batch)
    return jnp.mean(per_sample_B)
