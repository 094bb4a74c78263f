"""The network output parameterisations and every conversion between them, in one place.

With x_t = alpha_t x_0 + sigma_t eps (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)):

- ``"epsilon"``: the network predicts eps (Ho et al. 2020);
- ``"sample"``: the network predicts x_0 (diffusers' name; CompVis ``parameterization="x0"``);
- ``"v_prediction"``: v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, "Progressive Distillation",
  sec. 4; CompVis/SD2 ``parameterization="v"``).

The formulas are those of diffusers' schedulers (e.g. DDIMScheduler.step). All math runs in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_ALIASES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def canonical_prediction_type(prediction_type: str) -> str:
    """Map aliases (eps, x0, v) to diffusers' names; ValueError listing the choices otherwise."""
    name = _ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        choices = PREDICTION_TYPES + tuple(_ALIASES)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {choices}")
    return name


def alpha_sigma(alphas_cumprod_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t))."""
    abar = jnp.asarray(alphas_cumprod_t, jnp.float32)
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def to_x0_eps(output, x_t, alpha, sigma, prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """Return (x0_pred, eps_pred) from a network output of the given prediction type."""
    kind = canonical_prediction_type(prediction_type)
    output = jnp.asarray(output, jnp.float32)
    x_t = jnp.asarray(x_t, jnp.float32)
    if kind == "epsilon":
        return (x_t - sigma * output) / alpha, output
    if kind == "sample":
        return output, (x_t - alpha * output) / sigma
    return alpha * x_t - sigma * output, alpha * output + sigma * x_t


def to_x0(output, x_t, alpha, sigma, prediction_type: str) -> jax.Array:
    """x0_pred from a network output."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return (jnp.asarray(x_t, jnp.float32) - sigma * jnp.asarray(output, jnp.float32)) / alpha
    return to_x0_eps(output, x_t, alpha, sigma, kind)[0]


def to_eps(output, x_t, alpha, sigma, prediction_type: str) -> jax.Array:
    """eps_pred from a network output."""
    return to_x0_eps(output, x_t, alpha, sigma, prediction_type)[1]


def to_v(x0, eps, alpha, sigma) -> jax.Array:
    """v = alpha_t eps - sigma_t x_0 (the v-prediction training target)."""
    return alpha * jnp.asarray(eps, jnp.float32) - sigma * jnp.asarray(x0, jnp.float32)


def from_x0_eps(x0, eps, alpha, sigma, prediction_type: str) -> jax.Array:
    """The network output of ``prediction_type`` that corresponds to (x0, eps)."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return jnp.asarray(eps, jnp.float32)
    if kind == "sample":
        return jnp.asarray(x0, jnp.float32)
    return to_v(x0, eps, alpha, sigma)


def as_epsilon_fn(denoise_fn, schedule, prediction_type: str):
    """Wrap ``denoise_fn(x_t, t_B)`` of any prediction type into an eps-predicting one.

    Converts each evaluation at its own (x_t, t); used to run a v- or x0-model with PLMS.
    """
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return denoise_fn

    def eps_fn(x_t, t_B):
        alpha, sigma = alpha_sigma(schedule.alphas_cumprod[t_B])
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        return to_eps(denoise_fn(x_t, t_B), x_t, alpha.reshape(shape), sigma.reshape(shape), kind)

    return eps_fn
