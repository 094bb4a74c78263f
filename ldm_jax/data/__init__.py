"""Input pipeline: TFDS (array_record, no TensorFlow) or in-memory sources -> grain -> per-host
batches; a TFDS builder for a folder of captioned images (`python -m ldm_jax.data.image_folder`)."""

from ldm_jax.data.errors import DataError
from ldm_jax.data.loader import (
    TrainIterator,
    check_batch_size,
    default_data_config,
    make_train_dataset,
    to_global_batch,
)
from ldm_jax.data.sources import register_source

__all__ = [
    "DataError",
    "TrainIterator",
    "check_batch_size",
    "default_data_config",
    "make_train_dataset",
    "register_source",
    "to_global_batch",
]
