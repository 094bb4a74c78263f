"""Shared sampler plumbing: argument checks, abar lookup, per-step noise, the scanned loop."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import NoiseSchedule


def as_timesteps(timesteps, prev_timesteps=None) -> tuple[jax.Array, jax.Array]:
    """int32 (t_N, prev_N); the default previous timestep is the next entry, -1 after the last."""
    t = jnp.asarray(timesteps, jnp.int32)
    if t.ndim != 1 or t.shape[0] < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {t.shape}")
    if prev_timesteps is None:
        prev = jnp.concatenate([t[1:], jnp.full((1,), -1, jnp.int32)])
    else:
        prev = jnp.asarray(prev_timesteps, jnp.int32)
        if prev.shape != t.shape:
            raise ValueError(f"prev_timesteps shape {prev.shape} != timesteps shape {t.shape}")
    return t, prev


def abar(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """alphas_cumprod[t] in fp32, with t < 0 meaning clean data (abar = 1)."""
    value = schedule.alphas_cumprod[jnp.maximum(t, 0)].astype(jnp.float32)
    return jnp.where(t < 0, jnp.float32(1.0), value)


def batch_t(t: jax.Array, x: jax.Array) -> jax.Array:
    """The scalar timestep broadcast to one entry per batch element (the t_B of ``denoise_fn``)."""
    return jnp.full((x.shape[0],), t, jnp.int32)


def check_x(x_T) -> jax.Array:
    x = jnp.asarray(x_T)
    if x.dtype != jnp.float32:
        raise ValueError(f"x_T must be float32 (sampler math runs in fp32), got {x.dtype}")
    return x


def step_noise_source(rng, noise, num_steps: int, x: jax.Array, name: str):
    """Per-step N(0, I) noise: precomputed ``noise`` [N, *x.shape] or drawn from fold_in(rng, i)
    (``rng`` one key, or one key per batch element, which reproduces a sample alone or in any
    batch)."""
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != (num_steps,) + x.shape:
            raise ValueError(f"noise must have shape {(num_steps,) + x.shape}, got {noise.shape}")
        return noise, lambda i, n: n
    if rng is None:
        raise ValueError(f"{name} draws noise every step: pass rng (a jax PRNG key) or noise")
    if is_key_batch(rng):  # one key per batch element: each sample's noise is its own
        if rng.shape[0] != x.shape[0]:
            raise ValueError(f"rng holds {rng.shape[0]} keys for a batch of {x.shape[0]}")

        def draw(i, _):
            def one(key):
                return jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], jnp.float32)

            return jax.vmap(one)(rng)

        return jnp.zeros((num_steps,), jnp.float32), draw
    return jnp.zeros((num_steps,), jnp.float32), lambda i, _: jax.random.normal(
        jax.random.fold_in(rng, i), x.shape, jnp.float32
    )


def is_key_batch(rng) -> bool:
    """Whether ``rng`` is a batch of PRNG keys (typed keys [B], or raw uint32 keys [B, 2])."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.ndim == 1
    return rng.ndim == 2


def scan_steps(step: Callable, carry, xs, num_steps: int, callback: Callable | None):
    """Run ``step(carry, (i, *xs)) -> carry`` for i < num_steps in one lax.scan.

    ``callback(i, x)`` (optional, e.g. a progress bar) is called on the host through
    ``jax.debug.callback`` after step i with the new sample (``carry[0]``).
    """

    def body(carry, inputs):
        carry = step(carry, inputs)
        if callback is not None:
            jax.debug.callback(callback, inputs[0], carry[0])
        return carry, None

    index = jnp.arange(num_steps, dtype=jnp.int32)
    carry, _ = jax.lax.scan(body, carry, (index, *xs))
    return carry
