"""Discrete noise schedules of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

Ho et al. 2020 (DDPM) define betas_t and abar_t = prod_{s<=t} (1 - beta_s); Nichol & Dhariwal 2021
add the cosine schedule. Kinds, with their reference equivalents:

- ``"scaled_linear"`` (alias ``"compvis_linear"``): linspace of sqrt(beta), squared. This is what
  CompVis ``make_beta_schedule("linear")`` builds (ldm/modules/diffusionmodules/util.py) and what
  diffusers calls ``beta_schedule="scaled_linear"``; Stable Diffusion uses it with 0.00085 .. 0.012.
- ``"linear"``: plain linspace of beta (diffusers ``"linear"``, the DDPM paper's 1e-4 .. 0.02).
- ``"cosine"``: abar(t) = cos^2(((t / T) + 0.008) / 1.008 * pi / 2), betas clipped at 0.999
  (diffusers ``"squaredcos_cap_v2"``, CompVis ``"cosine"``).

Betas and abar are computed in float64 and stored in float32 whatever the network's dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("scaled_linear", "compvis_linear", "linear", "cosine")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """betas_T and alphas_cumprod_T (float32, index = training timestep 0 .. T-1); a JAX pytree."""

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        betas64 = np.asarray(betas, dtype=np.float64)
        if betas64.ndim != 1 or betas64.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas64.shape}")
        if np.any(betas64 <= 0) or np.any(betas64 >= 1):
            raise ValueError("betas must lie in (0, 1)")
        alphas_cumprod = np.cumprod(1.0 - betas64)
        return cls(
            betas=jnp.asarray(betas64, jnp.float32),
            alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        )


def make_schedule(
    kind: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> NoiseSchedule:
    """Build a NoiseSchedule; ``beta_start``/``beta_end`` are ignored by ``"cosine"``."""
    T = num_train_timesteps
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {T}")
    if kind in ("scaled_linear", "compvis_linear"):
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif kind == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        )
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}")
    return NoiseSchedule.from_betas(betas)


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t_B: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4).

    ``t_B`` holds one integer timestep per batch element; the result has x0's dtype (math in fp32).
    """
    abar_B = schedule.alphas_cumprod[t_B]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = jnp.sqrt(abar_B).reshape(shape)
    s = jnp.sqrt(1.0 - abar_B).reshape(shape)
    out = a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)
    return out.astype(x0.dtype)
