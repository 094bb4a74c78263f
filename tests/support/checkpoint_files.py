"""Writing test checkpoints as users have them, and comparing parameter trees bit for bit."""

import json

import jax
import numpy as np
import safetensors.numpy
import torch

from ldm_jax.checkpoints.compvis.export import SPEC_METADATA_KEY, save_compvis
from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.files import open_tensor_file
from support.tiny_specs import random_params


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


def export_compvis(spec, path):
    """(tensors, spec dict): `spec` with random weights exported as an ldm_jax CompVis file at
    `path`, read back (the tensors a lying file can reuse, the metadata it can alter)."""

    save_compvis(CheckpointContents(spec, random_params(spec), None), path)
    with open_tensor_file(path) as f:
        return {k: f[k] for k in f}, json.loads(f.extras[SPEC_METADATA_KEY])


def with_value(data, where, value):
    """A deep copy of JSON-like `data` with the entry at key path `where` set to `value`."""
    data = json.loads(json.dumps(data))
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return data
