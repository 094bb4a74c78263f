"""A pipeline with a LoRA against diffusers' (`fuse_lora`, saved and reloaded as a user's folder):
DDIM images from the same latents; scales and unloading without recompiling."""

import diffusers
import numpy as np
import torch
from support.lora_files import random_factors, write_kohya
from support.tiny_pipelines import sd_pipeline

from ldm_jax.sampling.pipeline import LatentDiffusionPipeline

PIXEL_BAR = 2 / 255
SCALE = 0.7


def test_images_match_diffusers(tmp_path, parity):
    """DDIM, CFG 7.5, 5 steps with a kohya LoRA at scale 0.7, the same initial latents."""
    base = sd_pipeline()
    base.save_pretrained(tmp_path / "base")
    lora_file = tmp_path / "kohya.safetensors"
    write_kohya(lora_file, random_factors(base, 0, ranks=(2, 3), alpha=2.5))
    fused = sd_pipeline()
    fused.load_lora_weights(str(lora_file))
    fused.fuse_lora(lora_scale=SCALE)
    fused.unload_lora_weights()
    fused.save_pretrained(tmp_path / "fused")
    fused = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "fused")  # as a user's
    fused.set_progress_bar_config(disable=True)
    assert isinstance(fused.scheduler, diffusers.DDIMScheduler)
    prompts, negatives = ["a photo of a cat", "a harbour"], ["blurry", ""]
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    reference = fused(
        prompt=prompts, negative_prompt=negatives, num_inference_steps=5, guidance_scale=7.5,
        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np",
    ).images  # fmt: skip
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "base")
    kwargs = dict(negative_prompt=negatives, num_inference_steps=5, guidance_scale=7.5,
                  latents=latents, output_type="np")  # fmt: skip
    plain = pipe(prompts, **kwargs).images
    compiled = pipe._generate._cache_size()
    original = pipe.params
    pipe.load_lora(lora_file, scale=SCALE)
    ours = pipe(prompts, **kwargs).images
    error = float(np.abs(ours - reference).max())
    print(f"LoRA pipeline images: max |ours - diffusers| = {error:.2e} (x255: {error * 255:.2f})")
    assert error <= PIXEL_BAR
    parity("pipeline with a kohya LoRA (scale 0.7) vs diffusers fuse_lora (pixels)", ours,
           reference, PIXEL_BAR)  # fmt: skip
    assert np.abs(plain - reference).max() > 10 * PIXEL_BAR  # the LoRA changes the images

    # new scales and unloading swap params only: never a recompile
    pipe.set_lora_scales({"kohya": 0.0})
    assert np.array_equal(pipe(prompts, **kwargs).images, plain)
    pipe.unload_lora()
    assert pipe.params is original and pipe.loras == {}
    assert np.array_equal(pipe(prompts, **kwargs).images, plain)
    assert pipe._generate._cache_size() == compiled
