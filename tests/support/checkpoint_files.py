"""Writing test checkpoints as users have them, and comparing parameter trees bit for bit."""

import jax
import numpy as np
import safetensors.numpy
import torch


def assert_same_params(a, b):
    """Same tree, dtypes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def write_state_dict(path, state_dict):
    """A .safetensors file, or (any other suffix) a Lightning-style torch checkpoint."""
    if path.suffix == ".safetensors":
        safetensors.numpy.save_file(state_dict, str(path))
    else:  # a Lightning checkpoint
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
        torch.save({"state_dict": tensors, "global_step": 470000, "epoch": 3}, path)
    return path
