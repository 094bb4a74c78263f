"""Exponential moving average of the parameters (CompVis LitEma).

LitEma increments its update counter n and then uses decay = min(max_decay, (1 + n) / (10 + n)),
so early averages follow the parameters closely; the EMA tree has the params' shardings.
"""

import jax
import jax.numpy as jnp


def ema_decay(num_updates, max_decay: float) -> jax.Array:
    """min(max_decay, (1 + n) / (10 + n)) for the n-th update (n counts from 1, as in LitEma)."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(jnp.float32(max_decay), (1.0 + n) / (10.0 + n))


def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf (in the EMA's dtype)."""
    decay = jnp.asarray(decay, jnp.float32)
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
        ema_params,
        params,
    )
