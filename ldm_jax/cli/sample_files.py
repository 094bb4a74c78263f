"""The files sample.py writes: one PNG per image and grid.png, each with the settings (and the
image's own seed) as its "parameters" text, written all-or-nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ldm_jax.images import make_grid, to_pil

GRID_NAME = "grid.png"


def output_names(n: int) -> list[str]:
    """The per-image file names for n images: 00.png, 01.png, ..."""
    digits = max(2, len(str(n - 1)))
    return [f"{i:0{digits}d}.png" for i in range(n)]


def write_images(images_BHWC, out: Path, metadata: dict, seeds=None) -> list[Path]:
    """Save the per-image PNGs and grid.png, each with ``metadata`` as its "parameters" text
    (plus the image's own seed; the grid lists them all), into ``out``: all are written into a
    temporary folder there first, then moved into place, so a failed encode leaves no partial
    set."""
    from PIL import Image  # noqa: PLC0415
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415

    def info(**extra) -> PngInfo:
        text = PngInfo()
        text.add_text("parameters", json.dumps({**metadata, **extra}))
        return text

    names = output_names(len(images_BHWC))
    grid = Image.fromarray(make_grid(images_BHWC))
    seeds = [None] * len(names) if seeds is None else list(seeds)
    infos = [info() if seed is None else info(seed=seed) for seed in seeds]
    infos.append(info() if seeds[0] is None else info(seeds=seeds))
    files = [*zip(names, to_pil(images_BHWC), strict=True), (GRID_NAME, grid)]
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sample-", dir=out))
    try:
        for (name, image), text in zip(files, infos, strict=True):
            image.save(staging / name, pnginfo=text)
        written = []
        for name, _ in files:
            os.replace(staging / name, out / name)
            written.append(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
