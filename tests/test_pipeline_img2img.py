"""Image-to-image with strength against diffusers' StableDiffusionImg2ImgPipeline (tiny, random)."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
from PIL import Image
from support.tiny_pipelines import sd_pipeline, torch_noise

from ldm_jax.sampling.inputs import strength_slice
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline, sampler_iterations

PIXEL_BAR = 2 / 255
PROMPTS = ["a photo of a cat", "an oil painting of a harbour"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img2img") / "sd"
    sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(folder):
    return LatentDiffusionPipeline.from_pretrained(folder)


def _image(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_matches_diffusers_img2img(folder, pipe, parity, monkeypatch):
    # diffusers samples the VAE posterior; ours takes its mean: give diffusers the mean too
    monkeypatch.setattr(
        img2img_module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode()
    )
    reference_pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    reference_pipe.set_progress_bar_config(disable=True)
    image = _image()
    generator, noise = torch_noise((2, 4, 8, 8), seed=0)
    kwargs = dict(num_inference_steps=5, guidance_scale=7.5, strength=0.6)
    with torch.no_grad():
        reference = reference_pipe(
            PROMPTS, image=image, negative_prompt=["blurry", ""], generator=generator,
            output_type="np", **kwargs,
        ).images  # fmt: skip
    seen = []
    ours = pipe(PROMPTS, negative_prompt=["blurry", ""], image=image, latents=noise,
                output_type="np", callback_on_step_end=lambda i, t, x: seen.append(i),
                **kwargs).images  # fmt: skip
    assert ours.shape == reference.shape == (2, 16, 16, 3)
    parity("pipeline img2img: SD1-style DDIM v, strength 0.6, 5 steps (pixels)", ours, reference,
           PIXEL_BAR)  # fmt: skip
    print(f"img2img max abs pixel diff: {np.abs(ours - reference).max():.2e}")
    assert np.abs(ours - reference).max() <= PIXEL_BAR
    assert seen == [0, 1, 2] == list(range(sampler_iterations("ddim", 5, 0.6)))
    # the image matters, and so does strength
    other = pipe(PROMPTS, negative_prompt=["blurry", ""], image=_image(1), latents=noise,
                 output_type="np", callback_on_step_end=lambda i, t, x: None,
                 **kwargs).images  # fmt: skip
    assert np.abs(other - reference).max() > 10 * PIXEL_BAR
    assert pipe._generate._cache_size() == 1  # a new image reuses the compiled function


def test_strength_slice_is_diffusers_get_timesteps():
    for steps, strength, start in ((5, 0.6, 2), (50, 0.75, 13), (10, 1.0, 0), (3, 0.34, 2)):
        assert strength_slice(steps, strength) == start
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\], got 0.0"):
        strength_slice(5, 0.0)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\], got 1.5"):
        strength_slice(5, 1.5)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        strength_slice(5, 0.1)


def test_bad_img2img_inputs(pipe):
    image = _image()
    with pytest.raises(ValueError, match=r"image is 16x16 pixels .* but 32x24 is needed"):
        pipe("x", image=image, strength=0.5, height=24, width=32)
    with pytest.raises(ValueError, match="needs both image= and strength="):
        pipe("x", image=image)
    with pytest.raises(ValueError, match="needs both image= and strength="):
        pipe("x", strength=0.5)
    with pytest.raises(ValueError, match="mask_image does not apply to this checkpoint"):
        pipe("x", image=image, strength=0.5, mask_image=image)
    with pytest.raises(ValueError, match="low_res_image does not apply"):
        pipe("x", low_res_image=image)
    with pytest.raises(ValueError, match="image holds 3 images but the batch is 2"):
        pipe(["x", "y"], image=[image] * 3, strength=0.5)
    with pytest.raises(ValueError, match=r"float values must lie in \[0, 1\]"):
        pipe("x", image=np.full((16, 16, 3), 2.0, np.float32), strength=0.5)
    with pytest.raises(ValueError, match="class_labels does not apply.*takes prompt"):
        pipe(class_labels=[1])
    with pytest.raises(ValueError, match=r"this checkpoint \(text-to-image\) needs prompt"):
        pipe()
    with pytest.raises(ValueError, match="batch_size does not apply: one image per prompt"):
        pipe("x", batch_size=2)
