"""Noise levels of the sigma-space (k-diffusion family) samplers: Euler, Euler ancestral, Heun.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM)
write the VP process in sigma space, x = x_VP sqrt(sigma^2 + 1) with
sigma_t = sqrt((1 - abar_t) / abar_t), so the probability-flow ODE becomes
dx/dsigma = (x - D(x; sigma)) / sigma with D the denoised x0.

Everything here is traceable jnp (fp32), so timesteps and schedule may be jit arguments; the
functions mirror diffusers' ``EulerDiscreteScheduler.set_timesteps`` (``interpolation_type=
"linear"``) and its ``_convert_to_karras`` / ``_sigma_to_t`` step for step:

- ``timestep_sigmas``: sigma at (possibly fractional) timesteps, linear interpolation in t;
- ``karras_sigmas``: EDM eq. 5, (s_max^(1/rho) + ramp (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7,
  with diffusers' sigma_min / sigma_max = the last / first of the timestep sigmas;
- ``sigma_to_t``: the fractional timestep of a sigma, linear interpolation in log sigma.

Karras sigmas visit fractional timesteps: the denoiser gets float t (the UNet's timestep embedding
takes floats).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedules import NoiseSchedule
from ldm_jax.diffusion.timesteps import make_timesteps

INIT_NOISE = ("sigma_max", "vp")


def sigma_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, spacing: str = "linspace", steps_offset=0
) -> np.ndarray:
    """Decreasing float32 timesteps of diffusers' Euler/Heun ``set_timesteps``: "linspace" keeps
    the fractional ``linspace(0, T - 1, N)`` (``make_timesteps`` rounds it), "leading" and
    "trailing" are ``make_timesteps``'s integers."""
    if spacing == "linspace":
        T, N = int(num_train_timesteps), int(num_steps)
        return np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()
    if spacing not in ("leading", "trailing"):
        raise ValueError(f"unknown spacing {spacing!r}; choose linspace, leading or trailing")
    return make_timesteps(num_steps, num_train_timesteps, spacing, steps_offset).astype(np.float32)


def schedule_sigmas(schedule: NoiseSchedule) -> jax.Array:
    """sigma_t = sqrt((1 - abar_t) / abar_t) per training timestep (fp32, like diffusers)."""
    a = schedule.alphas_cumprod.astype(jnp.float32)
    return jnp.sqrt((1.0 - a) / a)


def timestep_sigmas(schedule: NoiseSchedule, t_N: jax.Array) -> jax.Array:
    """sigma at float timesteps: ``np.interp(t, arange(T), sigmas)`` (diffusers)."""
    sigmas_T = schedule_sigmas(schedule)
    grid_T = jnp.arange(sigmas_T.shape[0], dtype=jnp.float32)
    return jnp.interp(jnp.asarray(t_N, jnp.float32), grid_T, sigmas_T)


def karras_sigmas(sigma_max, sigma_min, num_steps: int, rho: float = 7.0) -> jax.Array:
    """EDM eq. 5: ``num_steps`` sigmas from sigma_max down to sigma_min, spaced in sigma^(1/rho)."""
    ramp = jnp.asarray(np.linspace(0.0, 1.0, num_steps), jnp.float32)
    max_inv_rho = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
    min_inv_rho = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma_N: jax.Array, log_sigmas_T: jax.Array) -> jax.Array:
    """Fractional timestep of each sigma: diffusers ``_sigma_to_t`` (interpolate log sigma between
    the two neighbouring training sigmas, weight clipped to [0, 1])."""
    log_sigma_N = jnp.log(jnp.maximum(sigma_N, 1e-10))
    dists_TN = log_sigma_N[None, :] - log_sigmas_T[:, None]
    T = log_sigmas_T.shape[0]
    low_N = jnp.argmax(jnp.cumsum(dists_TN >= 0, axis=0), axis=0).clip(max=T - 2)
    low, high = log_sigmas_T[low_N], log_sigmas_T[low_N + 1]
    w_N = jnp.clip((low - log_sigma_N) / (low - high), 0.0, 1.0)
    return (1.0 - w_N) * low_N + w_N * (low_N + 1)


def sampling_sigmas(
    schedule: NoiseSchedule, timesteps, *, use_karras_sigmas: bool = False, first_step: int = 0,
    last_step: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(t_N, sigmas_{N+1}): the float timesteps the denoiser sees and the sigmas, 0 appended.

    ``timesteps`` are diffusers' (float, decreasing, e.g. ``linspace(0, T - 1, N)``: pass the
    fractional values for parity); with ``use_karras_sigmas`` they only fix sigma_max / sigma_min.
    ``first_step`` drops the steps before it (image-to-image: diffusers' ``set_begin_index``),
    after the sigmas of all N steps are made, as Karras sigmas depend on N. ``last_step``
    (exclusive) stops there, at that step's sigma instead of 0 (SDXL's ``denoising_end``).
    """
    t_N = jnp.asarray(timesteps, jnp.float32)
    if t_N.ndim != 1 or t_N.shape[0] < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {t_N.shape}")
    sigma_N = timestep_sigmas(schedule, t_N)
    if use_karras_sigmas:
        sigma_N = karras_sigmas(sigma_N[0], sigma_N[-1], t_N.shape[0])
        t_N = sigma_to_t(sigma_N, jnp.log(schedule_sigmas(schedule))).astype(jnp.float32)
    N = t_N.shape[0]
    check_first_step(first_step, N)
    last = N if last_step is None else last_step
    if not isinstance(last, int) or not first_step < last <= N:
        raise ValueError(f"last_step must be an int in [{first_step + 1}, {N}], got {last_step!r}")
    sigma_N1 = jnp.concatenate([sigma_N, jnp.zeros((1,), jnp.float32)])
    return t_N[first_step:last], sigma_N1[first_step : last + 1]


def check_first_step(first_step: int, num_steps: int) -> None:
    """A static first step that leaves at least one of the N steps to run."""
    if not isinstance(first_step, int) or not 0 <= first_step < num_steps:
        raise ValueError(f"first_step must be an int in [0, {num_steps - 1}], got {first_step!r}")


def initial_sample(x_T: jax.Array, sigmas: jax.Array, init_noise: str) -> jax.Array:
    """x_T (unit noise, or a VP sample at the first timestep) in sigma space.

    diffusers multiplies by ``init_noise_sigma``: sigma_max for "linspace"/"trailing" spacing
    (``"sigma_max"``), sqrt(sigma_max^2 + 1) for "leading" (``"vp"``, exact for a VP sample).
    """
    if init_noise not in INIT_NOISE:
        raise ValueError(f"unknown init_noise {init_noise!r}; choose one of {INIT_NOISE}")
    sigma_max = jnp.max(sigmas)
    scale = sigma_max if init_noise == "sigma_max" else jnp.sqrt(sigma_max**2 + 1.0)
    return x_T * scale


def denoised(output, x, sigma, prediction_type: str) -> jax.Array:
    """D(x; sigma), the x0 estimate, from the network output at x / sqrt(sigma^2 + 1), exactly
    as diffusers' Euler/Heun ``step`` computes ``pred_original_sample``."""
    output = jnp.asarray(output, jnp.float32)
    if prediction_type == "epsilon":
        return x - sigma * output
    if prediction_type == "v_prediction":
        return output * (-sigma / (sigma**2 + 1.0) ** 0.5) + x / (sigma**2 + 1.0)
    return output


def scale_input(x, sigma) -> jax.Array:
    """diffusers ``scale_model_input``: x / sqrt(sigma^2 + 1), the VP sample the network expects."""
    return x / ((sigma**2 + 1.0) ** 0.5)


def batch_t(t, x) -> jax.Array:
    """The float timestep broadcast to one entry per batch element."""
    return jnp.full((x.shape[0],), t, jnp.float32)
