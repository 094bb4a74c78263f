"""The shapes TFDS builder: array_record files written and read back without TensorFlow."""

import importlib.util
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ldm_jax.data import loader, shapes_builder
from ldm_jax.data.shapes import Scene, ShapesConfig, generate_example, parse_caption

NAME = "captioned_shapes/tiny"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfds")
    assert shapes_builder.main(["--data-dir", str(folder), "--config", "tiny"]) == 0
    return str(folder)


def test_data_source_reads_what_the_generator_makes_without_tensorflow(data_dir):
    config = ShapesConfig(32, num_train=64, num_test=16)
    for split, count in (("train", 64), ("test", 16)):
        source = tfds.data_source(NAME, split=split, data_dir=data_dir)
        assert len(source) == count
        indices = sorted(int(source[i]["index"]) for i in range(count))
        assert indices == list(range(count))  # every example once, in TFDS's own order
        for position in (0, count - 1):
            stored = source[position]
            made = generate_example(config, split, int(stored["index"]))
            np.testing.assert_array_equal(stored["image"], made["image"])  # PNG is lossless
            caption = stored["caption"].decode()
            assert caption == made["caption"]
            assert Scene.from_record(stored["attributes"]) == parse_caption(caption)
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules
    files = tfds.builder(NAME, data_dir=data_dir).info.file_format
    assert str(getattr(files, "value", files)) == "array_record"


def test_prepared_dataset_is_read_by_the_tfds_loader(data_dir):
    cfg = loader.default_data_config(
        source="tfds", name=NAME, data_dir=data_dir, image_size=32, num_threads=1, flip=False
    )
    batch = next(iter(loader.make_train_dataset(cfg, None, 4, 0)))
    assert batch["image"].shape == (4, 32, 32, 3)


def test_configs_and_unknown_config(tmp_path):
    names = [c.name for c in shapes_builder.CaptionedShapes.BUILDER_CONFIGS]
    assert names == ["32px", "64px", "tiny"]
    assert shapes_builder.CaptionedShapes.BUILDER_CONFIGS[1].shapes.image_size == 64
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        shapes_builder.prepare(str(tmp_path), "huge")
