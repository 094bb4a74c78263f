"""Host-side augmentation: deterministic per (seed, index), geometry of resize/crop/flip, range."""

import numpy as np
import pytest

from ldm_jax.data.errors import DataError
from ldm_jax.data.transforms import (
    AugmentConfig,
    as_rgb_uint8,
    augment,
    center_crop,
    example_rng,
    random_crop,
    resize_short_side,
    to_float,
)


def _coordinates(height, width) -> np.ndarray:
    """uint8 image whose pixel (y, x) is (y, x, 0): crops reveal where they were cut."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)


def test_same_seed_and_index_give_the_same_example():
    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    config = AugmentConfig(image_size=16, min_scale=1.0, max_scale=1.5)
    first = augment(image, config, example_rng(3, 11))
    np.testing.assert_array_equal(first, augment(image, config, example_rng(3, 11)))
    others = [augment(image, config, example_rng(s, i)) for s, i in [(3, 12), (4, 11)]]
    assert all(not np.array_equal(first, other) for other in others)
    assert first.shape == (16, 16, 3) and first.dtype == np.float32
    assert -1.0 <= first.min() and first.max() <= 1.0


def test_resize_short_side_keeps_aspect_ratio():
    assert resize_short_side(np.zeros((40, 20, 3), np.uint8), 10).shape == (20, 10, 3)
    assert resize_short_side(np.zeros((20, 40, 3), np.uint8), 30).shape == (30, 60, 3)
    assert resize_short_side(np.zeros((33, 50, 3), np.uint8), 16).shape == (16, 24, 3)
    same = np.ones((8, 9, 3), np.uint8)
    assert resize_short_side(same, 8) is same


def test_crops_cut_a_window_of_the_image():
    image = _coordinates(12, 20)
    center = center_crop(image, 8)
    assert (center[0, 0, 0], center[0, 0, 1]) == (2, 6)
    tops_lefts = set()
    for index in range(50):
        crop = random_crop(image, 8, example_rng(0, index))
        top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        np.testing.assert_array_equal(crop, image[top : top + 8, left : left + 8])
        tops_lefts.add((top, left))
    assert {t for t, _ in tops_lefts} == set(range(5))  # every offset reachable, none beyond
    assert max(left for _, left in tops_lefts) <= 12 and len(tops_lefts) > 20


def test_flip_half_the_time_and_never_when_disabled():
    image = _coordinates(8, 8)
    outs = [augment(image, AugmentConfig(image_size=8), example_rng(0, i)) for i in range(200)]
    flipped = [np.array_equal(out, to_float(image[:, ::-1])) for out in outs]
    kept = [np.array_equal(out, to_float(image)) for out in outs]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # exactly one of the two
    assert 70 < sum(flipped) < 130
    for i in range(20):
        out = augment(image, AugmentConfig(image_size=8, flip=False), example_rng(0, i))
        np.testing.assert_array_equal(out, to_float(image))


def test_center_crop_config_is_deterministic_without_scale():
    image = _coordinates(10, 14)
    config = AugmentConfig(image_size=10, crop="center", flip=False)
    outs = {augment(image, config, example_rng(0, i)).tobytes() for i in range(5)}
    assert len(outs) == 1
    np.testing.assert_array_equal(
        augment(image, config, example_rng(0, 0)), to_float(image[:, 2:12])
    )


def test_to_float_range_and_channel_handling():
    np.testing.assert_array_equal(to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(as_rgb_uint8(gray), np.repeat(gray[..., None], 3, -1))
    rgba = np.arange(2 * 2 * 4, dtype=np.uint8).reshape(2, 2, 4)
    np.testing.assert_array_equal(as_rgb_uint8(rgba), rgba[..., :3])
    with pytest.raises(DataError, match="must be uint8"):
        as_rgb_uint8(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(DataError, match="expected .* C in 1, 3, 4"):
        as_rgb_uint8(np.zeros((2, 2, 2), np.uint8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"image_size": 8, "min_scale": 0.5}, "1 <= min_scale <= max_scale"),
        ({"image_size": 8, "min_scale": 1.5, "max_scale": 1.2}, "1 <= min_scale <= max_scale"),
        ({"image_size": 8, "crop": "left"}, r"crop must be one of \('random', 'center'\)"),
    ],
)
def test_bad_augment_config(kwargs, message):
    with pytest.raises(DataError, match=message):
        AugmentConfig(**kwargs)


def test_negative_seed_is_refused():
    with pytest.raises(DataError, match="must be >= 0"):
        example_rng(-1, 0)
