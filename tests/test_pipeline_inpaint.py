"""Inpainting: SD's 9-channel model against diffusers' StableDiffusionInpaintPipeline, and LDM's
7-channel model against the equations of CompVis scripts/inpaint.py (tiny, random)."""

import dataclasses

import diffusers
import jax
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
from PIL import Image
from support.tiny_pipelines import reference_ddim, sd_inpaint_pipeline, torch_noise
from support.tiny_specs import TINY_VQ, random_params

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.models.factory import network_modules
from ldm_jax.models.unet import UNetConfig
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from ldm_jax.spec import DiffusionSpec, ModelSpec, spec_from_dict, spec_to_dict

PIXEL_BAR = 2 / 255
RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
MASK = np.zeros((16, 16), np.uint8)
MASK[4:12, 2:10] = 255  # white = repaint


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint") / "sd-inpaint"
    sd_inpaint_pipeline().save_pretrained(folder)
    return folder


def test_sd_inpainting_matches_diffusers(sd_folder, parity, monkeypatch):
    monkeypatch.setattr(  # diffusers samples the VAE posterior; ours takes its mean
        inpaint_module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode()
    )
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    assert pipe.spec.diffusion.concat_input == "mask_and_masked_image"
    assert pipe.task.name == "inpainting" and pipe.spec.unet.in_channels == 9
    reference_pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(sd_folder)
    reference_pipe.set_progress_bar_config(disable=True)
    _, noise = torch_noise((2, 4, 8, 8), seed=0)
    prompts = ["a red bench", "a cat"]
    with torch.no_grad():
        reference = reference_pipe(
            prompts, image=Image.fromarray(IMAGE), mask_image=Image.fromarray(MASK),
            num_inference_steps=5, guidance_scale=7.5,
            latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
            output_type="np",
        ).images  # fmt: skip
    ours = pipe(prompts, image=Image.fromarray(IMAGE), mask_image=MASK, num_inference_steps=5,
                latents=noise, output_type="np").images  # fmt: skip
    diff = np.abs(ours - reference).max()
    print(f"SD inpainting max abs pixel diff: {diff:.2e}")
    parity("pipeline inpaint: SD 9-channel, DDIM v, CFG 7.5, 5 steps (pixels)", ours, reference,
           PIXEL_BAR)  # fmt: skip
    assert diff <= PIXEL_BAR
    # the mask reaches the model: another mask, other pixels
    other = pipe(prompts, image=IMAGE, mask_image=255 - MASK, num_inference_steps=5,
                 latents=noise, output_type="np").images  # fmt: skip
    assert np.abs(other - reference).max() > 10 * PIXEL_BAR
    with pytest.raises(ValueError, match="inpainting needs image= and mask_image="):
        pipe("x", image=IMAGE)
    with pytest.raises(ValueError, match=r"mask_image is 8x8 pixels .* but 16x16 is needed"):
        pipe("x", image=IMAGE, mask_image=MASK[:8, :8])
    with pytest.raises(ValueError, match="low_res_image does not apply"):
        pipe("x", image=IMAGE, mask_image=MASK, low_res_image=IMAGE)


LDM_INPAINT = ModelSpec(
    first_stage=TINY_VQ,
    unet=UNetConfig(
        in_channels=7,  # latents 3 + masked-image encoding 3 + mask 1
        out_channels=3,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=16,
    ),
    diffusion=DiffusionSpec(
        linear_start=0.0015, linear_end=0.0205, scale_factor=1.0, conditioning_key="concat",
        concat_input="masked_image_and_mask", latent_size=8,
    ),  # fmt: skip
)


def _compvis_inpaint(params, image_u8, mask_u8, x_T, steps):
    """CompVis scripts/inpaint.py (make_batch, then the sampling and pasting), our networks."""
    modules = network_modules(LDM_INPAINT)
    vq, unet = modules["first_stage"][0], modules["unet"][0]
    image = image_u8[None].astype(np.float32) / 255
    mask = (mask_u8[None, ..., None].astype(np.float32) / 255 >= 0.5).astype(np.float32)
    batch = {"image": image, "mask": mask, "masked_image": (1 - mask) * image}
    batch = {k: v * 2.0 - 1.0 for k, v in batch.items()}
    c = vq.apply({"params": params["first_stage"]}, batch["masked_image"], method="encode")
    cc = batch["mask"][:, ::2, ::2]  # interpolate(size=c.shape[-2:]), nearest, factor 2
    c = np.concatenate([np.asarray(c), cc], axis=-1)
    scheduler = diffusers.DDIMScheduler(  # = CompVis DDIMSampler (uniform, ends at abar_0)
        beta_start=0.0015, beta_end=0.0205, beta_schedule="scaled_linear",
        set_alpha_to_one=False, steps_offset=1, clip_sample=False,
    )  # fmt: skip

    def unet_fn(x, t):
        x_in = np.concatenate([x, c], axis=-1)
        return unet.apply({"params": params["unet"]}, x_in, np.full((1,), t, np.int32))

    samples = reference_ddim(unet_fn, x_T, scheduler, steps)
    decoded = vq.apply({"params": params["first_stage"]}, samples, method="decode")
    image = np.clip((batch["image"] + 1.0) / 2.0, 0.0, 1.0)
    mask = np.clip((batch["mask"] + 1.0) / 2.0, 0.0, 1.0)
    predicted = np.clip((np.asarray(decoded) + 1.0) / 2.0, 0.0, 1.0)
    return (1 - mask) * image + mask * predicted


def test_ldm_inpainting_matches_compvis_script(parity):
    params = random_params(LDM_INPAINT, seed=3)
    pipe = LatentDiffusionPipeline(LatentDiffusionCheckpoint(LDM_INPAINT, params))
    assert pipe.task.name == "inpainting" and pipe.task.conditioning is None
    x_T = RNG.standard_normal((1, 8, 8, 3)).astype(np.float32)
    reference = _compvis_inpaint(params, IMAGE, MASK, x_T, steps=4)
    ours = pipe(image=IMAGE, mask_image=MASK, num_inference_steps=4, latents=x_T,
                output_type="np").images
    diff = np.abs(ours - reference).max()
    print(f"LDM inpainting max abs pixel diff: {diff:.2e}")
    parity("pipeline inpaint: LDM 7-channel, DDIM, 4 steps (pixels)", ours, reference, PIXEL_BAR)
    assert diff <= PIXEL_BAR
    keep = MASK < 128
    np.testing.assert_allclose(ours[0][keep], IMAGE[keep] / 255, atol=1e-6)  # pasted back
    assert np.abs(ours[0][~keep] - IMAGE[~keep] / 255).max() > 0.1  # the hole is repainted
    with pytest.raises(ValueError, match="strength does not apply"):
        pipe(image=IMAGE, mask_image=MASK, strength=0.5)
    with pytest.raises(ValueError, match="prompt does not apply"):
        pipe("a cat", image=IMAGE, mask_image=MASK)
    mask = jax.numpy.asarray(MASK)
    images = pipe(batch_size=2, image=IMAGE, mask_image=mask, num_inference_steps=1,
                  output_type="uint8").images
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_concat_input_round_trips_and_defaults():
    data = spec_to_dict(LDM_INPAINT)
    assert spec_from_dict(data) == LDM_INPAINT
    del data["diffusion"]["concat_input"]  # a spec saved before the field existed
    assert spec_from_dict(data).diffusion.concat_input is None
    with pytest.raises(ValueError, match="unknown concat_input 'depth'"):
        dataclasses.replace(LDM_INPAINT.diffusion, concat_input="depth")
