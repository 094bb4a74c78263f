"""The shapes dataset as a TFDS builder: array_record files, readable without TensorFlow.

```python
import tensorflow_datasets as tfds
import ldm_jax.data.shapes_builder  # registers "captioned_shapes"

train = tfds.data_source("captioned_shapes/32px", split="train", data_dir="~/tensorflow_datasets")
train[0]  # {"image": uint8 [32, 32, 3], "caption": b"...", "attributes": {...}, "index": 17}
```

``tfds.data_source`` generates the files on first use (offline; ~8 s of CPU per 10k examples at
32×32, 13 MB for ``32px``). Training can skip the files: ``config.data.source = "shapes"`` reads
the same examples generated in memory (``shapes.in_memory_source``).
Images are yielded as PNG bytes (numpy images would need TensorFlow to encode). Configs:
``32px`` (default, 20k train / 1k test), ``64px`` (same scenes at 64×64) and ``tiny`` (32×32,
64 / 16: tests and CI). Attribute text fields decode to bytes; ``Scene.from_record`` reads them.
TFDS stores examples in its own (deterministic) shuffled order; ``index`` is the example's number
in ``ShapesSource`` / ``generate_example``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data.shapes import SPLITS, ShapesConfig, generate_example

NAME = "captioned_shapes"
_ATTRIBUTE_TEXT = ("relation", "shape1", "color1", "size1", "shape2", "color2", "size2")


@dataclasses.dataclass(kw_only=True)
class ShapesBuilderConfig(tfds.core.BuilderConfig):
    shapes: ShapesConfig = dataclasses.field(default_factory=ShapesConfig)


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
    """One or two coloured shapes per image, captioned ("a red circle above a blue square")."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ShapesBuilderConfig(name="32px", description="32x32, 20k/1k", shapes=ShapesConfig(32)),
        ShapesBuilderConfig(name="64px", description="64x64, 20k/1k", shapes=ShapesConfig(64)),
        ShapesBuilderConfig(
            name="tiny",
            description="32x32, 64 train / 16 test (tests, CI)",
            shapes=ShapesConfig(32, num_train=64, num_test=16),
        ),
    ]
    DEFAULT_CONFIG_NAME = "32px"
    # no checksums file (nothing is downloaded); tfds would otherwise look for one beside this
    # module through importlib_resources, which tensorflow-datasets does not install
    code_path = None

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        # array_record by default: TFDS's default (tfrecord) needs TensorFlow to write and read
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.shapes.image_size
        attributes = {key: tfds.features.Text() for key in _ATTRIBUTE_TEXT}
        attributes["num_objects"] = tfds.features.Scalar(dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "attributes": tfds.features.FeaturesDict(attributes),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "caption"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated offline
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config.shapes
        for index in range(config.num_examples(split)):
            example = generate_example(config, split, index)
            yield index, {**example, "image": png_bytes(example["image"]), "index": index}


def png_bytes(image) -> bytes:
    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def prepare(data_dir: str, config: str = CaptionedShapes.DEFAULT_CONFIG_NAME):
    """Generate the array_record files (if not there yet) and return the builder."""
    names = [c.name for c in CaptionedShapes.BUILDER_CONFIGS]
    if config not in names:
        raise ValueError(f"unknown config {config!r}; choose one of {names}")
    builder = CaptionedShapes(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_jax.data.shapes_builder",
        description="Write the captioned shapes dataset as TFDS array_record files (offline); "
        f"read it with data.source='tfds', data.name='{NAME}/<config>'.",
    )
    parser.add_argument("--data-dir", required=True, help="TFDS data folder to write into")
    names = [c.name for c in CaptionedShapes.BUILDER_CONFIGS]
    parser.add_argument("--config", choices=names, default=CaptionedShapes.DEFAULT_CONFIG_NAME)
    args = parser.parse_args(argv)
    builder = prepare(args.data_dir, args.config)
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    print(f"{NAME}/{args.config} ({splits}) is in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
