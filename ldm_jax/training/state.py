"""The train state and its sharded, abstract-first initialisation.

`create_sharded_state(init_fn, mesh, rules, *args)` works for any state pytree: `init_fn` returns it
with nn.LogicallyPartitioned leaves (params straight from `module.init`, or re-boxed with
`sharding.box_like`, and optimizer states built from boxed params inherit the boxes), jax.eval_shape
finds the shapes and names without allocating, the rules turn them into NamedShardings, and
jit(init_fn, out_shardings) creates every leaf directly in its shards. The autoencoder trainer uses
the same helpers with its own state class.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.training.sharding import DEFAULT_LOGICAL_RULES, logical_shardings


@flax.struct.dataclass
class TrainState:
    """step counts train_step calls (micro-batches when accumulating gradients).

    `scale_factor` is the latent scale (fixed, or 1/std of the first batch's latents with
    scale_by_std): kept in the state so a resumed run uses exactly the same value.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    scale_factor: jax.Array


def state_shardings(abstract_boxed_state, mesh, rules=DEFAULT_LOGICAL_RULES):
    """NamedShardings for a (boxed, abstract) state: boxed leaves by their logical names."""
    return logical_shardings(abstract_boxed_state, mesh, rules)


def create_sharded_state(
    init_fn: Callable[..., Any], mesh, rules=DEFAULT_LOGICAL_RULES, *args
) -> tuple[Any, Any]:
    """(state, shardings): init_fn(*args) run under jit with the state's shardings as outputs.

    Nothing is materialised on one device: shapes come from jax.eval_shape, and each leaf is created
    in place on its shards. `args` (an rng, or already sharded pretrained params) are jit inputs.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return state, shardings


def new_train_state(boxed_params, optimizer, scale_factor: float) -> TrainState:
    """A step-0 TrainState; call inside create_sharded_state's init_fn with boxed params so the
    optimizer state and EMA inherit the parameters' logical axes."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=boxed_params,
        opt_state=optimizer.init(boxed_params),
        ema_params=jax.tree.map(jnp.copy, boxed_params),
        scale_factor=jnp.asarray(scale_factor, jnp.float32),
    )
