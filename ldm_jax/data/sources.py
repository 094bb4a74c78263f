"""Where training examples come from: a prepared TFDS dataset (array_record, read with
`as_data_source`, no TensorFlow), a user's image folder (built into one on first use), or an
in-memory sequence (the built-in shapes dataset, tests).

Each is a random-access sequence of dict records; grain reads it by index.
"""

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ldm_jax.data.errors import DataError

InMemoryFactory = Callable[..., Sequence]  # (data_cfg, split) -> Sequence of dict records

# Built-in in-memory sources, imported when first named (no import cycle with the package):
# the module defines `in_memory_source(data_cfg, split) -> Sequence[dict]`.
_BUILTIN_MODULES = {"shapes": "ldm_jax.data.shapes"}
_REGISTRY: dict[str, InMemoryFactory] = {}
FILE_SOURCES = ("tfds", "folder")


def register_source(name: str, factory: InMemoryFactory) -> None:
    """Make `config.data.source = name` read `factory(data_cfg, split)`, a Sequence of dicts."""
    if name in FILE_SOURCES:
        raise DataError(f"source name {name!r} is reserved; reserved: {FILE_SOURCES}")
    _REGISTRY[name] = factory


def source_names() -> tuple[str, ...]:
    return (*FILE_SOURCES, *sorted(set(_REGISTRY) | set(_BUILTIN_MODULES)))


def default_data_dir() -> str:
    """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepared_datasets(data_dir: str | Path) -> list[str]:
    """'name[/config]:version' of every prepared TFDS dataset under data_dir."""
    root = Path(data_dir)
    found = []
    for info in sorted(root.glob("*/*/dataset_info.json")) + sorted(
        root.glob("*/*/*/dataset_info.json")
    ):
        parts = info.parent.relative_to(root).parts
        if any(part.startswith(".") or part.startswith("incomplete") for part in parts):
            continue
        found.append("/".join(parts[:-1]) + ":" + parts[-1])
    return found


def _not_prepared(name: str, data_dir: str, reason: str = "") -> DataError:
    prepared = prepared_datasets(data_dir)
    listing = ", ".join(prepared) if prepared else "none"
    return DataError(
        f"dataset {name!r} is not prepared in data_dir {data_dir}{reason}; prepared there: "
        f"{listing}. Prepare it as array_record (for a folder of images: python -m "
        "ldm_jax.data.image_folder SRC_DIR --data-dir DIR --name NAME)"
    )


def tfds_source(name: str, split: str, data_dir: str | None) -> Sequence:
    """The split of a prepared array_record TFDS dataset, as a random-access source."""
    if not name:
        raise DataError("data.name is empty; name the TFDS dataset to read (e.g. 'my_images')")
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    if not Path(data_dir).is_dir():
        raise DataError(f"data_dir {data_dir} does not exist; set data.data_dir to the TFDS folder")
    import tensorflow_datasets as tfds  # noqa: PLC0415 - slow import, only when reading TFDS

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError):
        raise _not_prepared(name, data_dir) from None
    if not prepared:
        raise _not_prepared(name, data_dir)
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
        raise _not_prepared(name, data_dir, f" as array_record (it is {file_format})")
    try:
        source = builder.as_data_source(split=split)
    except ValueError as error:  # unknown split, bad slice
        raise DataError(
            f"cannot read split {split!r} of {name}: {error}; splits: {list(builder.info.splits)}"
        ) from None
    return source


def folder_source(folder: str, name: str, split: str, data_dir: str, process_count: int):
    """A user's image folder, built into data_dir/name on first use (one process only: on a pod
    prepare it once with the CLI, since hosts would race to write it)."""
    from ldm_jax.data import image_folder  # noqa: PLC0415

    if not data_dir:
        raise DataError("data.data_dir is empty; set where the folder's TFDS dataset is written")
    name = name or "image_folder"
    data_dir, folder = os.path.expanduser(data_dir), os.path.expanduser(folder)
    if not (Path(data_dir) / name / image_folder.VERSION).is_dir():
        if not folder:
            raise DataError("data.folder is empty; set it to the folder of captioned images")
        if process_count > 1:
            raise _not_prepared(name, data_dir, " (multi-host runs read a prepared dataset)")
        image_folder.build_image_folder_dataset(folder, data_dir, name=name)
    return tfds_source(name, split, data_dir)


def in_memory_source(source: str, data_cfg, split: str) -> Sequence:
    if source not in _REGISTRY and source in _BUILTIN_MODULES:
        module = importlib.import_module(_BUILTIN_MODULES[source])
        _REGISTRY.setdefault(source, module.in_memory_source)
    if source not in _REGISTRY:
        raise DataError(f"unknown data.source {source!r}; allowed: {source_names()}")
    return _REGISTRY[source](data_cfg, split)
