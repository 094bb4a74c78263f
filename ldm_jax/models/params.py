"""Creating, shaping and counting parameter trees without materialising them needlessly."""

from typing import Any

import flax.linen as nn
import jax
import numpy as np


def abstract_params(module: nn.Module, *example_inputs: Any, **kwargs: Any) -> Any:
    """Parameter shapes (unboxed ShapeDtypeStruct leaves) via jax.eval_shape: no memory used."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs, **kwargs))
    return nn.meta.unbox(variables["params"])


def init_params(module: nn.Module, rng: jax.Array, *example_inputs: Any, **kwargs: Any) -> Any:
    """Randomly initialised parameters as a plain (unboxed) pytree."""
    return nn.meta.unbox(module.init(rng, *example_inputs, **kwargs)["params"])


def count_params(params: Any) -> int:
    """Number of scalar parameters in a tree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
