"""LatentDiffusionPipeline end to end against diffusers' StableDiffusionPipeline (tiny, random)."""

import dataclasses
import json
import shutil

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from support.tiny_pipelines import sd_pipeline

from ldm_jax.atomic import DestinationExistsError
from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.models.conditioning import SpatialRescalerConfig
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from ldm_jax.spec import CondStageSpec

PROMPTS = ["a photo of a cat", "an oil painting of a harbour"]
NEGATIVES = ["blurry", "low quality, jpeg artefacts"]
PIXEL_BAR = 2 / 255  # acceptance: max |ours - diffusers| on [0, 1] images


def _diffusers_images(folder, prompts, negatives, latents_NHWC, steps=5, scale=7.5, rescale=0.0):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    latents = torch.from_numpy(np.ascontiguousarray(latents_NHWC.transpose(0, 3, 1, 2)))
    out = pipe(
        prompt=prompts,
        negative_prompt=negatives,
        num_inference_steps=steps,
        guidance_scale=scale,
        guidance_rescale=rescale,
        latents=latents,
        output_type="np",
    )
    return out.images  # float [B, H, W, 3] in [0, 1]


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    """The tiny SD1-style pipeline as saved by diffusers (DDIM, v_prediction, set_alpha_to_one)."""
    folder = tmp_path_factory.mktemp("pipeline") / "sd-v"
    sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eps_folder(v_folder, tmp_path_factory):
    """The same weights with an epsilon scheduler ending at abar_0, as the SD 1.5 release."""
    folder = tmp_path_factory.mktemp("pipeline") / "sd-eps"
    shutil.copytree(v_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1)
    config_file.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def v_pipe(v_folder):
    return LatentDiffusionPipeline.from_pretrained(v_folder)


def _latents(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 8, 8, 4)).astype(np.float32)


def test_matches_diffusers_v_prediction(v_folder, v_pipe, parity):
    diffusion = v_pipe.spec.diffusion  # timestep settings read from the folder's scheduler
    assert (diffusion.timestep_spacing, diffusion.steps_offset, diffusion.set_alpha_to_one) == (
        "leading", 1, True
    )  # fmt: skip
    assert v_pipe.spec.diffusion.prediction_type == "v_prediction"
    latents = _latents(2)
    reference = _diffusers_images(v_folder, PROMPTS, NEGATIVES, latents)
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=7.5)
    ours = v_pipe(PROMPTS, latents=latents, output_type="np", **kwargs).images
    assert ours.shape == reference.shape == (2, 16, 16, 3)
    parity("pipeline: SD1-style DDIM v, CFG 7.5, 5 steps (pixels)", ours, reference, PIXEL_BAR)
    ours_uint8 = v_pipe(PROMPTS, latents=latents, output_type="uint8", **kwargs).images
    assert ours_uint8.dtype == np.uint8
    reference_uint8 = np.round(reference * 255).astype(np.int32)
    assert np.abs(ours_uint8.astype(np.int32) - reference_uint8).max() <= 2
    # the comparison sees the settings: ending at abar_0 instead of abar = 1 changes the pixels
    other_spec = dataclasses.replace(
        v_pipe.spec, diffusion=dataclasses.replace(diffusion, set_alpha_to_one=False)
    )
    other_pipe = LatentDiffusionPipeline(
        LatentDiffusionCheckpoint(other_spec, v_pipe.params, v_pipe.tokenizer)
    )
    other = other_pipe(PROMPTS, latents=latents, output_type="np", **kwargs).images
    assert np.abs(other - reference).max() > PIXEL_BAR
    assert 0.2 < np.mean((reference > 0) & (reference < 1))  # not just saturated pixels


def test_guidance_rescale_matches_diffusers(v_folder, v_pipe, parity):
    """diffusers' guidance_rescale (Lin et al. 2024) on the v-model, 0.7 as the paper, without a
    recompile when only the rescale changes."""
    latents = _latents(2)
    reference = _diffusers_images(v_folder, PROMPTS, NEGATIVES, latents, rescale=0.7)
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=7.5,
                  latents=latents, output_type="np")
    plain = v_pipe(PROMPTS, **kwargs).images
    compiled = v_pipe._generate._cache_size()
    ours = v_pipe(PROMPTS, guidance_rescale=0.7, **kwargs).images
    assert v_pipe._generate._cache_size() == compiled
    parity("pipeline: SD1-style DDIM v, CFG 7.5, guidance_rescale 0.7 (pixels)", ours, reference,
           PIXEL_BAR)
    assert np.abs(plain - reference).max() > PIXEL_BAR  # the rescale changes the images


def test_matches_diffusers_epsilon_batch_sharded(eps_folder, parity):
    pipe = LatentDiffusionPipeline.from_pretrained(eps_folder)
    diffusion = pipe.spec.diffusion
    assert (diffusion.timestep_spacing, diffusion.steps_offset, diffusion.set_alpha_to_one) == (
        "leading", 1, False
    )  # fmt: skip
    assert pipe.spec.diffusion.prediction_type == "epsilon"
    batch = 8  # divides the 8 fake CPU devices of conftest: the batch is sharded
    assert pipe.mesh.size == jax.local_device_count() == 8
    assert pipe._batch_sharding(batch).spec == jax.sharding.PartitionSpec("data")
    assert pipe._batch_sharding(2).spec == jax.sharding.PartitionSpec()
    prompts = [f"prompt number {i}" for i in range(batch)]
    latents = _latents(batch, seed=1)
    reference = _diffusers_images(eps_folder, prompts, ["blurry"] * batch, latents)
    ours = pipe(prompts, negative_prompt="blurry", num_inference_steps=5, latents=latents,
                output_type="np").images  # fmt: skip
    parity("pipeline: SD1-style DDIM eps, CFG 7.5, 5 steps, batch 8 sharded", ours, reference,
           PIXEL_BAR)  # fmt: skip


def test_one_compilation_across_prompts_scales_and_weights(v_pipe):
    pipe = LatentDiffusionPipeline(
        LatentDiffusionCheckpoint(v_pipe.spec, v_pipe.params, v_pipe.tokenizer)
    )
    a = pipe("a red cube", num_inference_steps=2, seed=0, output_type="uint8").images
    b = pipe("a blue sphere on a table", num_inference_steps=2, seed=0, guidance_scale=3.0,
             output_type="uint8").images
    c = pipe("a red cube", num_inference_steps=2, seed=1, output_type="uint8").images
    assert pipe._generate._cache_size() == 1
    assert a.shape == (1, 16, 16, 3) and a.dtype == np.uint8  # default size: latent_size * 2
    again = pipe("a red cube", num_inference_steps=2, seed=0, output_type="uint8").images
    assert np.array_equal(a, again)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    pipe.params = jax.tree.map(lambda p: p * 0.5, pipe.params)  # new weights, same shapes
    pipe("a red cube", num_inference_steps=2, seed=0, output_type="uint8")
    assert pipe._generate._cache_size() == 1
    # another sampler, without guidance (prompt only): one more compilation
    unguided = pipe("a red cube", num_inference_steps=2, sampler="dpm_solver", guidance_scale=1.0,
                    output_type="np").images  # fmt: skip
    assert unguided.shape == (1, 16, 16, 3) and unguided.dtype == np.float32
    # DDIM with eta > 0 draws per-step noise from rng: same latents, other rng -> other image
    x_T = _latents(1)
    noisy = [
        pipe("a red cube", num_inference_steps=2, eta=1.0, latents=x_T, seed=s,
             output_type="uint8").images for s in (0, 1)
    ]
    assert not np.array_equal(*noisy)


def test_save_pretrained_orbax_round_trip(v_pipe, tmp_path):
    """save_pretrained writes the pipeline's checkpoint; reloaded, it samples the same images."""
    folder = v_pipe.save_pretrained(tmp_path / "sd-orbax", format="orbax")
    again = LatentDiffusionPipeline.from_pretrained(folder)
    assert again.spec == v_pipe.spec  # timestep settings included
    kwargs = dict(negative_prompt="blurry", num_inference_steps=3, seed=4, output_type="np")
    ours = v_pipe(PROMPTS, **kwargs).images
    np.testing.assert_array_equal(again(PROMPTS, **kwargs).images, ours)
    with pytest.raises(DestinationExistsError):
        v_pipe.save_pretrained(folder, format="orbax")
    v_pipe.save_pretrained(folder, format="orbax", overwrite=True)


def test_bad_inputs(v_pipe):
    with pytest.raises(ValueError, match="multiple of 2"):
        v_pipe("x", height=15)
    with pytest.raises(ValueError, match="multiple of 2"):
        v_pipe("x", width=0)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        v_pipe("x", num_inference_steps=0)
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'.*ddim"):
        v_pipe("x", sampler="k_lms")
    with pytest.raises(ValueError, match="PLMS needs eps predictions"):
        v_pipe("x", sampler="plms", num_inference_steps=2)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but prompt has 2"):
        v_pipe(["x", "y"], negative_prompt=["z"])
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 8, 8, 4\)"):
        v_pipe(["x", "y"], latents=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="unknown output_type 'pt'"):
        v_pipe("x", output_type="pt")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        v_pipe([])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
        (dict(guidance_scale="7.5"), "guidance_scale must be a number"),
        (dict(eta=float("nan")), "eta must be a finite number"),
        (dict(eta=-0.1), r"eta must be in \[0, 1\]"),
        (dict(eta=1.5), r"eta must be in \[0, 1\]"),  # DDIM's update would be nan
        (dict(eta=0.5, sampler="dpm++"), "eta applies to the ddim sampler only"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*32 - 1\]"),
        (dict(seed=2**32), r"seed must be in \[0, 2\*\*32 - 1\]"),  # PRNGKey: seed 0's key
        (dict(seed=2**70), r"seed must be in \[0, 2\*\*32 - 1\]"),  # PRNGKey: OverflowError
        (dict(seed=1.5), "seed must be an integer"),
        (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
        (dict(guidance_rescale=float("nan")), "guidance_rescale must be a finite number"),
        (dict(strength=float("nan")), "strength must be a finite number"),
        (dict(strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(sampler="k_lms"), "unknown sampler 'k_lms'.*ddim, ddpm, plms, dpm_solver"),
    ],
)
def test_bad_numbers_are_refused_before_compiling(v_pipe, monkeypatch, kwargs, message):
    def generate(*args, **kwargs):
        raise AssertionError("compiled before the arguments were checked")

    monkeypatch.setattr(v_pipe, "_generate", generate)
    with pytest.raises(ValueError, match=message):
        v_pipe("x", num_inference_steps=2, **kwargs)


def test_sampler_aliases_share_one_compiled_function(v_pipe):
    """The CLI's "dpm++" and the config's "dpm_solver" are one sampler (and one compile)."""
    kwargs = dict(num_inference_steps=2, seed=1, output_type="np")
    ours = v_pipe("x", sampler="dpm_solver", **kwargs).images
    compiled = v_pipe._generate._cache_size()
    np.testing.assert_array_equal(v_pipe("x", sampler="dpm++", **kwargs).images, ours)
    assert v_pipe._generate._cache_size() == compiled
    largest_seed = v_pipe("x", sampler="dpm++", **{**kwargs, "seed": 2**32 - 1}).images
    assert largest_seed.shape == ours.shape and not np.array_equal(largest_seed, ours)


def test_unsupported_conditioning_is_not_implemented(v_pipe):
    rescaler = CondStageSpec("spatial_rescaler", SpatialRescalerConfig(out_channels=4))
    diffusion = dataclasses.replace(v_pipe.spec.diffusion, conditioning_key="concat")
    spec = dataclasses.replace(v_pipe.spec, cond_stage=rescaler, diffusion=diffusion)
    with pytest.raises(NotImplementedError, match="'spatial_rescaler'.*supported: text-to-image"):
        LatentDiffusionPipeline(LatentDiffusionCheckpoint(spec, v_pipe.params, v_pipe.tokenizer))


def test_to_pil():
    images = np.zeros((2, 16, 24, 3), np.uint8)
    pil = LatentDiffusionPipeline.to_pil(images)
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (24, 16)
    white = LatentDiffusionPipeline.to_pil(np.ones((1, 4, 4, 3), np.float32))[0]
    assert white.getpixel((0, 0)) == (255, 255, 255)
