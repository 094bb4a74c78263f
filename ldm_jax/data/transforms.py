"""Host-side image augmentation (numpy + PIL): short-side resize, crop, flip, [-1, 1] floats.

Every random choice comes from `example_rng(seed, index)`, a generator keyed by the run's seed and
the example's position in the global stream, so a resumed run (or any number of hosts or loader
threads) augments each example exactly as an uninterrupted single-host run would.
"""

import dataclasses

import numpy as np
from PIL import Image

from ldm_jax.data.errors import DataError

CROPS = ("random", "center")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """image_size: side of the square output. The short side is first resized to
    image_size × s, s ~ U[min_scale, max_scale] (1 ≤ min_scale ≤ max_scale; 1, 1 = exactly
    image_size), then a `crop` ("random" | "center") square is cut; `flip`: horizontal flip with
    probability 0.5."""

    image_size: int
    min_scale: float = 1.0
    max_scale: float = 1.0
    crop: str = "random"
    flip: bool = True

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise DataError(f"image_size must be a positive integer, got {self.image_size!r}")
        if not 1.0 <= self.min_scale <= self.max_scale:
            raise DataError(
                f"resize scales must satisfy 1 <= min_scale <= max_scale (the short side is never "
                f"below image_size), got min_scale={self.min_scale}, max_scale={self.max_scale}"
            )
        if self.crop not in CROPS:
            raise DataError(f"crop must be one of {CROPS}, got {self.crop!r}")


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for one example: a pure function of (seed, index)."""
    if seed < 0 or index < 0:
        raise DataError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index)])


def as_rgb_uint8(image) -> np.ndarray:
    """uint8 [H, W, 3] from a uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped)."""
    image_HWC = np.asarray(image)
    if image_HWC.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {image_HWC.dtype}")
    if image_HWC.ndim == 2:
        image_HWC = image_HWC[:, :, None]
    if image_HWC.ndim != 3 or image_HWC.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"image of shape {image_HWC.shape}; expected [H, W] or [H, W, C] with C in 1, 3, 4"
        )
    if image_HWC.shape[-1] == 1:
        return np.repeat(image_HWC, 3, axis=-1)
    return image_HWC[:, :, :3]


def resize_short_side(image_HWC: np.ndarray, short_side: int) -> np.ndarray:
    """Resize (bicubic, antialiased when shrinking) so min(H, W) == short_side, keeping the
    aspect ratio (the long side rounds to the nearest pixel)."""
    height, width = image_HWC.shape[:2]
    if min(height, width) == short_side:
        return image_HWC
    scale = short_side / min(height, width)
    if width <= height:
        size = (short_side, max(short_side, round(height * scale)))
    else:
        size = (max(short_side, round(width * scale)), short_side)
    return np.asarray(Image.fromarray(image_HWC).resize(size, Image.Resampling.BICUBIC))


def random_crop_box(height: int, width: int, size, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a random crop of `size` ((h, w) or a square side)."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left


def center_crop_box(height: int, width: int, size) -> tuple[int, int]:
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    return (height - crop_h) // 2, (width - crop_w) // 2


def random_crop(image_HWC: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top, left = random_crop_box(*image_HWC.shape[:2], size, rng)
    return image_HWC[top : top + size, left : left + size]


def center_crop(image_HWC: np.ndarray, size: int) -> np.ndarray:
    top, left = center_crop_box(*image_HWC.shape[:2], size)
    return image_HWC[top : top + size, left : left + size]


def to_float(image_HWC: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image_HWC.astype(np.float32) / 127.5 - 1.0


def augment(image, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One example: uint8 image (any size) -> float32 [S, S, 3] in [-1, 1]."""
    return augment_with_crop(image, config, rng)[0]


def augment_with_crop(image, config: AugmentConfig, rng: np.random.Generator):
    """`augment`, plus SDXL's micro-conditioning of the example: (image, original_size (h, w) of
    the source image, crop_top_left (top, left) of the crop in the resized image, counted from the
    left edge of the image as flipped)."""
    image_HWC = as_rgb_uint8(image)
    original = image_HWC.shape[:2]
    # Drawn in a fixed order whether or not each step is enabled, so toggling one option does not
    # change the others' draws.
    scale = rng.uniform(config.min_scale, config.max_scale)
    flip = rng.random() < 0.5
    short_side = max(config.image_size, round(config.image_size * scale))
    image_HWC = resize_short_side(image_HWC, short_side)
    size = config.image_size
    return _crop_and_flip(image_HWC, (size, size), config.crop, config.flip and flip, rng,
                          original)


def augment_to_bucket(image, bucket, crop: str, flip: bool, rng: np.random.Generator):
    """One example into an aspect-ratio bucket (h, w): the smallest resize that covers it, a
    `crop` ("random" | "center") of the bucket's shape, a flip with probability 0.5 if `flip`.
    Returns (float32 [h, w, 3], original_size, crop_top_left) as `augment_with_crop`."""
    from ldm_jax.data.buckets import cover_size  # noqa: PLC0415 - buckets imports errors only

    image_HWC = as_rgb_uint8(image)
    original = image_HWC.shape[:2]
    flipped = rng.random() < 0.5
    height, width = cover_size(*original, bucket)
    if (height, width) != original:
        image_HWC = np.asarray(
            Image.fromarray(image_HWC).resize((width, height), Image.Resampling.BICUBIC)
        )
    return _crop_and_flip(image_HWC, tuple(bucket), crop, flip and flipped, rng, original)


def _crop_and_flip(image_HWC, size_hw, crop, flip, rng, original):
    height, width = image_HWC.shape[:2]
    if crop == "random":
        top, left = random_crop_box(height, width, size_hw, rng)
    else:
        top, left = center_crop_box(height, width, size_hw)
    image_HWC = image_HWC[top : top + size_hw[0], left : left + size_hw[1]]
    if flip:  # the same crop, seen in the mirrored image
        image_HWC = image_HWC[:, ::-1]
        left = width - left - size_hw[1]
    info = np.asarray(original, np.int32), np.asarray((top, left), np.int32)
    return (to_float(image_HWC), *info)
