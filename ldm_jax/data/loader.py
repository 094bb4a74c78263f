"""The training input pipeline: records -> augmented, tokenised per-host numpy batches (grain).

One global stream, the same for any number of hosts: the examples are shuffled (reshuffled each
epoch) with the seed, repeated forever, augmented with a generator keyed by (seed, position in the
stream), then cut into per-host batches of global_batch_size / process_count; global batch s is
local batches s·P … s·P + P − 1, and host p reads only local batch s·P + p (grain's lazy
`MapDataset[p::P]`, so nothing else is decoded). A run on 1 host × 8 devices and on 2 hosts × 4
therefore trains on identical global batches, and the iterator state (the next local batch index,
JSON) resumes exactly, even on a different number of hosts.

Batches: {"image": f32 [b, S, S, 3] in [-1, 1]} plus "tokens" i32 [b, T] (if a tokenize_fn is
given) and/or "class_label" i32 [b] (if data.label_key is set). `to_global_batch` assembles the
global jax.Array with `jax.make_array_from_process_local_data`.
"""

from collections.abc import Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from ldm_jax.data import sources
from ldm_jax.data.errors import DataError
from ldm_jax.data.transforms import AugmentConfig, augment, example_rng

TokenizeFn = Callable[[Sequence[str]], np.ndarray]  # captions -> int ids [n, T]

_DEFAULTS = {
    "source": "tfds",  # "tfds" | "folder" | an in-memory source ("shapes")
    "name": "",  # TFDS dataset name (folder: the name it is built under, default image_folder)
    "data_dir": "",  # TFDS data_dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets for "tfds")
    "split": "train",
    "folder": "",  # source "folder": the folder of captioned images
    "image_key": "image",
    "caption_key": "caption",
    "label_key": "",  # "" = no class labels
    "image_size": 64,
    "global_batch_size": 8,
    "min_scale": 1.0,  # short side resized to image_size × U[min_scale, max_scale]
    "max_scale": 1.0,
    "crop": "random",  # "random" | "center"
    "flip": True,
    "shuffle": True,
    "shuffle_seed": -1,  # -1 = the run's seed
    "num_threads": 4,  # grain prefetch threads (0 = read on the training thread)
    "prefetch_batches": 4,
    "num_workers": 0,  # grain worker processes (needs a __main__ guard in the script)
}


def default_data_config(**overrides):
    """config.data with every key the loader reads (ml_collections.ConfigDict); overrides of
    unknown keys are an error."""
    import ml_collections  # noqa: PLC0415

    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise DataError(f"unknown data config keys {unknown}; allowed: {sorted(_DEFAULTS)}")
    return ml_collections.ConfigDict({**_DEFAULTS, **overrides})


def _get(data_cfg, key: str):
    if isinstance(data_cfg, Mapping):
        return data_cfg.get(key, _DEFAULTS[key])
    return getattr(data_cfg, key, _DEFAULTS[key])


def check_batch_size(global_batch_size, process_count: int, data_parallel_size: int = 1) -> int:
    """The per-host batch size; DataError unless the global batch splits evenly over the hosts
    and the data-parallel devices."""
    if not isinstance(global_batch_size, int | np.integer) or global_batch_size < 1:
        raise DataError(f"global batch size must be a positive integer, got {global_batch_size!r}")
    for count, what in (
        (process_count, "processes (hosts)"),
        (data_parallel_size, "data-parallel devices"),
    ):
        if global_batch_size % count:
            raise DataError(
                f"global batch size {global_batch_size} is not divisible by the {count} {what}; "
                f"use a multiple of {count}"
            )
    return int(global_batch_size) // process_count


def _text(value) -> str:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item())
    return str(value)


def _check_record(record, keys: dict[str, str]) -> None:
    if not isinstance(record, Mapping):
        raise DataError(f"dataset records must be dicts, got {type(record).__name__}")
    missing = {what: key for what, key in keys.items() if key not in record}
    if missing:
        wanted = ", ".join(f"data.{what}={key!r}" for what, key in missing.items())
        raise DataError(f"the dataset's records have no {wanted}; their keys: {sorted(record)}")


class TrainIterator:
    """Endless per-host batches with a JSON-able `get_state()` / `set_state(state)`."""

    def __init__(self, dataset: grain.MapDataset, read_options, num_workers: int, fingerprint):
        self.dataset = dataset  # batch k of this host = local batch k·P + p of the stream
        self.fingerprint = fingerprint
        iter_dataset = dataset.to_iter_dataset(read_options)
        if num_workers > 0:
            from absl import flags  # noqa: PLC0415 - grain workers read absl flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iter_dataset = iter_dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=num_workers)
            )
        self._iterator = iter(iter_dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def close(self) -> None:
        """Stop grain's prefetch threads / worker processes (also on garbage collection)."""
        self._iterator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def get_state(self) -> dict:
        return {"fingerprint": dict(self.fingerprint), "loader": self._iterator.get_state()}

    def set_state(self, state: Mapping) -> None:
        saved = dict(state.get("fingerprint", {}))
        changed = [
            f"{key}: saved {saved.get(key)!r}, now {self.fingerprint.get(key)!r}"
            for key in sorted(saved.keys() | self.fingerprint.keys())
            if saved.get(key) != self.fingerprint.get(key)
        ]
        if changed:
            raise DataError(
                f"the saved data-iterator state is from a different input pipeline "
                f"({'; '.join(changed)}); resume with the same data config and batch size"
            )
        self._iterator.set_state(state["loader"])


def load_source(data_cfg, process_count: int) -> Sequence:
    source, split = _get(data_cfg, "source"), _get(data_cfg, "split")
    if source == "tfds":
        return sources.tfds_source(_get(data_cfg, "name"), split, _get(data_cfg, "data_dir"))
    if source == "folder":
        return sources.folder_source(
            _get(data_cfg, "folder"),
            _get(data_cfg, "name"),
            split,
            _get(data_cfg, "data_dir"),
            process_count,
        )
    return sources.in_memory_source(source, data_cfg, split)


def make_train_dataset(
    data_cfg,
    tokenize_fn: TokenizeFn | None,
    global_batch_size: int,
    seed: int,
    *,
    source: Sequence | None = None,
    data_parallel_size: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Per-host training batches from `data_cfg` (see `default_data_config`), or from `source`
    (a Sequence of dict records) when given. Captions are tokenised with `tokenize_fn`
    (e.g. a CLIPTokenizer) when it is not None; process_index/count default to jax's."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_batch_size = check_batch_size(global_batch_size, process_count, data_parallel_size)
    shuffle_seed = _get(data_cfg, "shuffle_seed")
    seed = int(seed if shuffle_seed is None or shuffle_seed < 0 else shuffle_seed)
    if not 0 <= seed < 2**32:
        raise DataError(f"the data seed must be in [0, 2**32), got {seed}")
    augment_config = AugmentConfig(
        image_size=_get(data_cfg, "image_size"),
        min_scale=float(_get(data_cfg, "min_scale")),
        max_scale=float(_get(data_cfg, "max_scale")),
        crop=_get(data_cfg, "crop"),
        flip=bool(_get(data_cfg, "flip")),
    )
    records = load_source(data_cfg, process_count) if source is None else source
    if len(records) == 0:
        raise DataError(
            f"the dataset ({_get(data_cfg, 'source')} {_get(data_cfg, 'name')!r}, split "
            f"{_get(data_cfg, 'split')!r}) is empty"
        )
    keys = {"image_key": _get(data_cfg, "image_key")}
    if tokenize_fn is not None:
        keys["caption_key"] = _get(data_cfg, "caption_key")
    if _get(data_cfg, "label_key"):
        keys["label_key"] = _get(data_cfg, "label_key")
    _check_record(records[0], keys)

    def load(index: int, record) -> dict:
        example = {
            "image": augment(record[keys["image_key"]], augment_config, example_rng(seed, index))
        }
        if "caption_key" in keys:
            example["caption"] = _text(record[keys["caption_key"]])
        if "label_key" in keys:
            example["class_label"] = np.int32(record[keys["label_key"]])
        return example

    def collate(examples: Sequence[dict]) -> dict[str, np.ndarray]:
        batch = {"image": np.stack([e["image"] for e in examples])}
        if "caption_key" in keys:
            tokens = np.asarray(tokenize_fn([e["caption"] for e in examples]), dtype=np.int32)
            if tokens.ndim != 2 or tokens.shape[0] != len(examples):
                raise DataError(
                    f"tokenize_fn returned shape {tokens.shape} for {len(examples)} captions; "
                    "expected [n, T]"
                )
            batch["tokens"] = tokens
        if "label_key" in keys:
            batch["class_label"] = np.stack([e["class_label"] for e in examples])
        return batch

    dataset = grain.MapDataset.source(records)
    if _get(data_cfg, "shuffle"):
        dataset = dataset.shuffle(seed=seed)
    dataset = (
        dataset.repeat()
        .map_with_index(load)
        .batch(local_batch_size, drop_remainder=True, batch_fn=collate)
    )[process_index::process_count]
    fingerprint = {
        "num_examples": len(records),
        "global_batch_size": int(global_batch_size),
        "seed": seed,
        "shuffle": bool(_get(data_cfg, "shuffle")),
        "augment": repr(augment_config),
    }
    read_options = grain.ReadOptions(
        num_threads=int(_get(data_cfg, "num_threads")),
        prefetch_buffer_size=int(_get(data_cfg, "prefetch_batches")),
    )
    return TrainIterator(dataset, read_options, int(_get(data_cfg, "num_workers")), fingerprint)


def to_global_batch(local_batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """The global jax.Arrays of a batch whose rows are split over the hosts (each host passes its
    local rows); `sharding` (e.g. the leading dim over ("data", "fsdp")) or a dict of them."""
    global_batch = {}
    for key, local in local_batch.items():
        leaf_sharding = sharding[key] if isinstance(sharding, Mapping) else sharding
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        try:
            leaf_sharding.shard_shape(global_shape)
        except ValueError as error:
            raise DataError(
                f"batch {key!r} of global shape {global_shape} does not split over {leaf_sharding}"
                f" ({error}); make the global batch size a multiple of the data-parallel devices"
            ) from None
        global_batch[key] = jax.make_array_from_process_local_data(
            leaf_sharding, local, global_shape
        )
    return global_batch
