"""The built-in shapes dataset: determinism, disjoint splits, captions that match images."""

import hashlib

import ml_collections
import numpy as np
import pytest

from ldm_jax.data import loader, shapes
from ldm_jax.data.shapes import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesSource,
    generate_example,
    generate_scene,
    parse_caption,
)

N = 300


def _digest(image) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_examples_are_deterministic_and_random_access():
    config = ShapesConfig(image_size=32, seed=3)
    first, second = ShapesSource(config, "train"), ShapesSource(config, "train")
    for i in (0, 7, 19_999, 123):  # any order: example i depends on (seed, split, i) only
        a, b = first[i], second[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["caption"] == b["caption"] and a["attributes"] == b["attributes"]
    assert first[-1]["caption"] == first[len(first) - 1]["caption"]
    other_seed = ShapesSource(ShapesConfig(image_size=32, seed=4), "train")
    differ = sum(other_seed[i]["caption"] != first[i]["caption"] for i in range(20))
    assert differ >= 10


def test_splits_are_disjoint():
    config = ShapesConfig(image_size=32)
    train = {_digest(ShapesSource(config, "train")[i]["image"]) for i in range(N)}
    test = {_digest(ShapesSource(config, "test")[i]["image"]) for i in range(N)}
    assert len(train) == N and len(test) == N  # no repeats inside a split either
    assert not train & test
    assert (len(ShapesSource(config, "train")), len(ShapesSource(config, "test"))) == (20_000, 1000)


def test_captions_match_attributes_and_grammar():
    source = ShapesSource(ShapesConfig(image_size=32), "train")
    for i in range(N):
        example = source[i]
        scene = Scene.from_record(example["attributes"])
        assert parse_caption(example["caption"]) == scene
        assert scene.caption == example["caption"]
        assert scene.to_record() == example["attributes"]
    assert source.captions(5) == [source[i]["caption"] for i in range(5)]
    assert parse_caption("A  red circle left of a blue square.") == Scene(
        (ShapeObject("circle", "red"), ShapeObject("square", "blue")), "left of"
    )
    assert parse_caption("a small green triangle").objects == (
        ShapeObject("triangle", "green", "small"),
    )


def test_images_show_their_attributes():
    """Each object's colour sits at its placement's centre; two-object layouts obey the relation."""
    config = ShapesConfig(image_size=64)
    for i in range(100):
        scene, placements = generate_scene(config, "test", i)
        image = generate_example(config, "test", i)["image"]
        for obj, place in zip(scene.objects, placements, strict=True):
            y, x = int(place.cy * 64), int(place.cx * 64)
            np.testing.assert_allclose(image[y, x], COLORS[obj.color], atol=2)
            if len(scene.objects) == 1:
                low, high = shapes.EXTENTS[obj.size]
                assert low <= place.extent <= high
        if scene.relation is not None:
            a, b = placements
            dy, dx = a.cy - b.cy, a.cx - b.cx
            along, across = (dy, dx) if scene.relation in ("above", "below") else (dx, dy)
            sign = -1 if scene.relation in ("above", "left of") else 1
            assert sign * along >= (a.extent + b.extent) / 2 + shapes.GAP  # boxes apart
            assert abs(across) <= 2 * shapes.OBJECT_JITTER  # in a row along the axis
            for place in placements:  # every box inside the margin
                for centre in (place.cx, place.cy):
                    assert shapes.MARGIN - 1e-9 <= centre - place.extent / 2
                    assert centre + place.extent / 2 <= 1 - shapes.MARGIN + 1e-9
    corner = generate_example(config, "test", 0)["image"][0, 0]
    np.testing.assert_array_equal(corner, shapes.BACKGROUND)


def test_vocabulary_is_covered():
    scenes = [generate_scene(ShapesConfig(), "train", i)[0] for i in range(600)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {s.relation for s in scenes} - {None} == set(RELATIONS)
    assert {s.objects[0].size for s in scenes if len(s.objects) == 1} == set(SIZES)
    two = sum(len(s.objects) == 2 for s in scenes) / len(scenes)
    assert 0.7 < two < 0.8  # two_object_fraction = 0.75
    assert all(s.objects[0].color != s.objects[1].color for s in scenes if len(s.objects) == 2)


def test_sample_prompts_cover_the_vocabulary():
    scenes = [parse_caption(p) for p in shapes.SAMPLE_PROMPTS]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES) and {o.color for o in objects} == set(COLORS)
    assert {s.relation for s in scenes} - {None} == set(RELATIONS)
    assert {s.objects[0].size for s in scenes if s.relation is None} == set(SIZES)


def test_scenes_do_not_depend_on_image_size():
    small = ShapesSource(ShapesConfig(image_size=32), "test")
    large = ShapesSource(ShapesConfig(image_size=64), "test")
    assert small.captions(50) == large.captions(50)
    assert large[0]["image"].shape == (64, 64, 3) and large[0]["image"].dtype == np.uint8


def test_in_memory_source_hook():
    cfg = ml_collections.ConfigDict({"image_size": 16, "shapes_num_train": 10, "shapes_seed": 2})
    source = shapes.in_memory_source(cfg, "train")
    assert len(source) == 10 and source[3]["image"].shape == (16, 16, 3)
    assert source[3]["caption"] == ShapesSource(ShapesConfig(16, seed=2), "train")[3]["caption"]


def test_usable_through_the_data_loader():
    cfg = loader.default_data_config(source="shapes", image_size=32, num_threads=1, flip=False)
    iterator = loader.make_train_dataset(cfg, None, 4, 0)
    batch = next(iter(iterator))
    assert batch["image"].shape == (4, 32, 32, 3)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].max() == 1.0  # the white background


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ShapesSource(split="validation"), "unknown split"),
        (lambda: ShapesSource(ShapesConfig(num_test=5), "test")[5], "out of range"),
        (lambda: ShapesConfig(image_size=4), "image_size"),
        (lambda: parse_caption("a purple circle"), "cannot read caption"),
        (lambda: parse_caption("a red circle above a red square"), "different colours"),
        (lambda: Scene((ShapeObject("circle", "red", "huge"),)), "size must be one of"),
        (lambda: Scene((ShapeObject("hexagon", "red", "small"),)), "unknown attribute"),
        (lambda: Scene.from_record({"num_objects": 3}), "num_objects"),
    ],
)
def test_bad_input_is_one_clear_error(make, message):
    with pytest.raises((ValueError, IndexError), match=message):
        make()
