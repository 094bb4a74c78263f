"""Image arrays as grids, PIL images and PNG files: one implementation for training, sampling and
the CLIs.

Images are uint8 [B, H, W, C] arrays (or float in [0, 1], rounded to uint8 where a file needs it).
"""

import math
import os
from pathlib import Path

import numpy as np

from ldm_jax.atomic import atomic_output


def as_uint8(images) -> np.ndarray:
    """uint8 as is; float images in [0, 1] clipped and rounded to 0..255."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def make_grid(images_BHWC) -> np.ndarray:
    """Images of one size tiled row by row into a near-square grid of ceil(sqrt(B)) columns:
    uint8 [rows * H, cols * W, C]; unused cells stay black. PIL images are accepted too."""
    if len(images_BHWC) and not hasattr(images_BHWC, "shape"):  # a list of PIL images / arrays
        images_BHWC = np.stack([np.asarray(image) for image in images_BHWC])
    images_BHWC = as_uint8(images_BHWC)
    b, h, w, c = images_BHWC.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k, image in enumerate(images_BHWC):
        row, col = divmod(k, cols)
        grid[row * h : (row + 1) * h, col * w : (col + 1) * w] = image
    return grid


def to_pil(images_BHWC) -> list:
    """uint8 (or float in [0, 1]) [B, H, W, 3] images as a list of PIL images."""
    from PIL import Image  # noqa: PLC0415 - Pillow is needed only where images become files

    return [Image.fromarray(image) for image in as_uint8(images_BHWC)]


def write_png(image_HWC, path: str | os.PathLike, *, pnginfo=None) -> Path:
    """One PNG written atomically (a temporary file beside `path`, then renamed over it)."""
    from PIL import Image  # noqa: PLC0415

    path = Path(path)
    with atomic_output(path, overwrite=True) as temporary:
        Image.fromarray(as_uint8(image_HWC)).save(temporary, format="PNG", pnginfo=pnginfo)
    return path
