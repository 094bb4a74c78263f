"""Unconditional LDM and LDM super-resolution against diffusers' LDMPipeline and
LDMSuperResolutionPipeline (tiny, random VQ models)."""

import diffusers
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec
from support.tiny_pipelines import ldm_pipeline, ldm_super_resolution_pipeline, torch_noise

from ldm_jax.sampling.pipeline import LatentDiffusionPipeline, sampler_iterations

PIXEL_BAR = 2 / 255


def test_unconditional_matches_diffusers_ldm_pipeline(tmp_path, parity):
    ldm_pipeline().save_pretrained(tmp_path / "ldm")
    reference_pipe = diffusers.LDMPipeline.from_pretrained(tmp_path / "ldm")
    reference_pipe.set_progress_bar_config(disable=True)
    generator, noise = torch_noise((2, 3, 8, 8), seed=0)
    with torch.no_grad():
        reference = reference_pipe(
            batch_size=2, generator=generator, num_inference_steps=5, output_type="np"
        ).images
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "ldm")
    assert pipe.task.name == "unconditional"
    ours = pipe(batch_size=2, num_inference_steps=5, latents=noise, output_type="np").images
    diff = np.abs(ours - reference).max()
    print(f"unconditional LDM max abs pixel diff: {diff:.2e}")
    parity("pipeline unconditional: LDM VQ, DDIM, 5 steps (pixels)", ours, reference, PIXEL_BAR)
    assert ours.shape == (2, 16, 16, 3) and diff <= PIXEL_BAR
    assert pipe(num_inference_steps=1,
                output_type="uint8").images.shape == (1, 16, 16, 3)  # batch_size defaults to 1
    with pytest.raises(ValueError, match=r"prompt does not apply.*\(use batch_size"):
        pipe("a face")
    with pytest.raises(ValueError, match="negative_prompt needs a text-conditioned checkpoint"):
        pipe(negative_prompt="blurry")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipe(batch_size=0)
    with pytest.raises(ValueError, match="mask_image does not apply"):
        pipe(mask_image=np.zeros((16, 16), np.uint8))
    # image-to-image works for unconditional models too; images are sharded with the batch
    image = np.full((16, 16, 3), 128, np.uint8)
    seen = []
    images = pipe(batch_size=8, image=image, strength=0.5, num_inference_steps=6, sampler="plms",
                  callback_on_step_end=lambda i, t, x: seen.append(i),
                  output_type="uint8").images  # fmt: skip
    assert images.shape == (8, 16, 16, 3) and pipe._batch_sharding(8).spec == PartitionSpec("data")
    assert len(seen) == sampler_iterations("plms", 6, 0.5) == 4  # 3 steps + PLMS's warm-up


def test_super_resolution_matches_diffusers(tmp_path, parity):
    ldm_super_resolution_pipeline().save_pretrained(tmp_path / "sr")
    reference_pipe = diffusers.LDMSuperResolutionPipeline.from_pretrained(tmp_path / "sr")
    reference_pipe.set_progress_bar_config(disable=True)
    low_res = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    low_res_NCHW = torch.from_numpy(low_res.transpose(2, 0, 1)[None].astype(np.float32) / 255)
    generator, noise = torch_noise((1, 3, 8, 8), seed=2)
    with torch.no_grad():
        reference = reference_pipe(
            image=low_res_NCHW * 2 - 1, generator=generator, num_inference_steps=5,
            output_type="np",
        ).images  # fmt: skip
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "sr")
    assert pipe.spec.diffusion.concat_input == "low_res_image"
    assert pipe.task.name == "super-resolution"
    ours = pipe(low_res_image=low_res, num_inference_steps=5, latents=noise,
                output_type="np").images
    diff = np.abs(ours - reference).max()
    print(f"super-resolution max abs pixel diff: {diff:.2e}")
    parity("pipeline super-resolution: LDM VQ, DDIM, 5 steps (pixels)", ours, reference, PIXEL_BAR)
    assert ours.shape == (1, 16, 16, 3) and diff <= PIXEL_BAR  # 2x the low-res size
    other = pipe(low_res_image=255 - low_res, num_inference_steps=5, latents=noise,
                 output_type="np").images
    assert np.abs(other - reference).max() > 10 * PIXEL_BAR  # the low-res image matters
    with pytest.raises(ValueError, match="super-resolution needs low_res_image="):
        pipe()
    with pytest.raises(ValueError, match=r"low_res_image is 8x8 pixels .* 12x12 is needed"):
        pipe(low_res_image=low_res, height=24, width=24)
    with pytest.raises(ValueError, match="image does not apply"):
        pipe(low_res_image=low_res, image=low_res)
