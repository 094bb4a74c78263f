"""Module-scoped fixtures of the tiny SDXL base + refiner: saved diffusers folders, our pipelines
and diffusers' (the SDXL parity tests import them: `from support.sdxl_fixtures import ...`)."""

import diffusers
import pytest

from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from support.tiny_pipelines import sdxl_pipeline, sdxl_refiner_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base folder, refiner folder) of the tiny SDXL pipelines, saved by diffusers."""
    root = tmp_path_factory.mktemp("sdxl")
    sdxl_pipeline().save_pretrained(root / "base")
    sdxl_refiner_pipeline().save_pretrained(root / "refiner")
    return root / "base", root / "refiner"


@pytest.fixture(scope="module")
def pipes(folders):
    """Our (base, refiner) pipelines from those folders."""
    return tuple(LatentDiffusionPipeline.from_pretrained(folder) for folder in folders)


@pytest.fixture(scope="module")
def references(folders):
    """diffusers' (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline) of them."""
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(folders[0])
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folders[1])
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner
