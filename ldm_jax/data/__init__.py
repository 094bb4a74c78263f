"""Input pipeline: TFDS (array_record, no TensorFlow) or in-memory sources -> grain -> per-host
batches; a TFDS builder for a folder of captioned images (`python -m ldm_jax.data.image_folder`).

The loader's names are imported lazily: `ldm_jax.data.shapes` (and the adherence evaluator that
uses it) must import where grain is not installed, e.g. a sampling-only machine.
"""

import importlib

_EXPORTS = {
    "DataError": "ldm_jax.data.errors",
    "TrainIterator": "ldm_jax.data.loader",
    "check_batch_size": "ldm_jax.data.loader",
    "default_data_config": "ldm_jax.data.loader",
    "make_train_dataset": "ldm_jax.data.loader",
    "to_global_batch": "ldm_jax.data.loader",
    "register_source": "ldm_jax.data.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldm_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
