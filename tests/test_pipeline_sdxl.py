"""SDXL sampling against diffusers (tiny, random weights): StableDiffusionXLPipeline (base),
StableDiffusionXLImg2ImgPipeline (refiner) and the base -> refiner hand-off (denoising_end /
denoising_start), same noise, fp32."""

import diffusers
import numpy as np
import pytest
import support.sdxl_fixtures
import torch
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as xl_i2i
from PIL import Image
from support.tiny_pipelines import sd_pipeline, torch_noise

from ldm_jax.cli import sample as sampling_cli
from ldm_jax.diffusion import sampler_plans
from ldm_jax.latent_diffusion import schedule_from_spec
from ldm_jax.sampling.inputs import strength_slice
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from ldm_jax.spec import DiffusionSpec

# the tiny SDXL base + refiner (folders, our pipelines, diffusers'), shared with other SDXL tests
folders, pipes, references = (support.sdxl_fixtures.folders, support.sdxl_fixtures.pipes,
                              support.sdxl_fixtures.references)

PIXEL_BAR = 2 / 255
PROMPTS = ["a photo of a cat", "an oil painting of a harbour"]
SHAPE_NCHW = (2, 4, 8, 8)  # 16 x 16 pixels (the tiny VAE halves)
STEPS = dict(num_inference_steps=5, guidance_scale=5.0)


def _generator():
    return torch_noise(SHAPE_NCHW, seed=0)[0]


NOISE = torch_noise(SHAPE_NCHW, seed=0)[1]


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


def test_base_matches_diffusers(pipes, references, parity):
    """Euler (SDXL's scheduler): an absent negative prompt gives zero embeddings
    (force_zeros_for_empty_prompt); prompt_2, negative prompts and non-default micro-conditioning
    (negative sizes too) reuse the compiled function: the time ids are traced."""
    pipe, reference = pipes[0], references[0]
    with torch.no_grad():
        expected = reference(PROMPTS, generator=_generator(), output_type="np", **STEPS).images
    ours = pipe(PROMPTS, latents=NOISE, sampler="euler", output_type="np", **STEPS).images
    assert ours.shape == expected.shape == (2, 16, 16, 3)
    parity("SDXL base: euler, CFG 5, zero negative (pixels)", ours, expected, PIXEL_BAR)
    assert np.abs(ours - expected).max() <= PIXEL_BAR
    micro = dict(
        prompt_2=["a cat, 35mm", "a harbour at dusk"], negative_prompt=["blurry", ""],
        original_size=(1024, 768), crops_coords_top_left=(64, 32), target_size=(24, 16),
    )  # fmt: skip
    with torch.no_grad():
        expected_2 = reference(
            PROMPTS, generator=_generator(), output_type="np", **STEPS, **micro
        ).images
    ours_2 = pipe(PROMPTS, latents=NOISE, sampler="euler", output_type="np", **STEPS, **micro)
    parity("SDXL base: euler, prompt_2, negative prompts, sizes/crops (pixels)", ours_2.images,
           expected_2, PIXEL_BAR)  # fmt: skip
    assert np.abs(ours_2.images - expected_2).max() <= PIXEL_BAR
    assert np.abs(expected_2 - expected).max() > 10 * PIXEL_BAR  # the options matter
    assert pipe._generate._cache_size() == 1
    # negative sizes: one prompt, since diffusers 0.42 pairs them with the wrong rows for more
    # (it repeats cat([negative, positive]) time ids per prompt: [n, p, n, p] vs [n, n, p, p])
    negative = dict(negative_original_size=(512, 512), negative_crops_coords_top_left=(8, 0),
                    negative_target_size=(16, 16), negative_prompt="blurry")  # fmt: skip
    generator, noise = torch_noise((1, 4, 8, 8), seed=1)
    with torch.no_grad():
        expected_3 = reference(PROMPTS[0], generator=generator, output_type="np", **STEPS,
                               **negative).images  # fmt: skip
    ours_3 = pipe(PROMPTS[0], latents=noise, sampler="euler", output_type="np", **STEPS,
                  **negative).images  # fmt: skip
    parity("SDXL base: euler, negative sizes/crop (pixels)", ours_3, expected_3, PIXEL_BAR)
    assert np.abs(ours_3 - expected_3).max() <= PIXEL_BAR


def test_refiner_img2img_matches_diffusers(pipes, references, parity, monkeypatch):
    # diffusers samples the VAE posterior; ours takes its mean: give diffusers the mean too
    monkeypatch.setattr(xl_i2i, "retrieve_latents", lambda out, **_: out.latent_dist.mode())
    pipe, reference = pipes[1], references[1]  # DDIM here (Euler: the hand-off test)
    ddim = diffusers.DDIMScheduler.from_config(reference.scheduler.config, clip_sample=False)
    monkeypatch.setattr(reference, "scheduler", ddim)  # clip_sample: false as SDXL's config
    kwargs = dict(image=_image(), strength=0.6, aesthetic_score=7.0, negative_aesthetic_score=2.0,
                  negative_prompt=["blurry", ""], **STEPS)  # fmt: skip
    with torch.no_grad():
        expected = reference(PROMPTS, generator=_generator(), output_type="np", **kwargs).images
    ours = pipe(PROMPTS, latents=NOISE, sampler="ddim", output_type="np", **kwargs).images
    parity("SDXL refiner img2img: ddim, strength 0.6, aesthetic 7/2 (pixels)", ours, expected,
           PIXEL_BAR)  # fmt: skip
    assert np.abs(ours - expected).max() <= PIXEL_BAR


def test_base_to_refiner_matches_diffusers(pipes, references, parity):
    """denoising_end=0.7 on the base (latents out, in the sampler's space: sigma space for
    Euler), denoising_start=0.7 on the refiner from those latents: the two pipelines of
    diffusers' "ensemble of experts". (DDIM's window is a slice of its timesteps, checked in
    test_denoising_window_counts_as_diffusers.)"""
    (base, refiner), (ref_base, ref_refiner) = pipes, references
    sampler = "euler"
    with torch.no_grad():
        latents = ref_base(PROMPTS, generator=_generator(), output_type="latent",
                           denoising_end=0.7, **STEPS).images  # fmt: skip
        expected = ref_refiner(PROMPTS, image=latents, denoising_start=0.7, output_type="np",
                               **STEPS).images  # fmt: skip
    seen = []
    ours_latents = base(PROMPTS, latents=NOISE, sampler=sampler, output_type="latent",
                        denoising_end=0.7, callback_on_step_end=lambda i, t, x: seen.append(t),
                        **STEPS).images  # fmt: skip
    assert seen == [801, 601, 401]  # leading spacing: the steps with t >= round(1000 - 700)
    parity(f"SDXL base denoising_end 0.7: {sampler} (latents)", ours_latents,
           latents.numpy().transpose(0, 2, 3, 1), 1e-4)  # fmt: skip
    seen = []
    ours = refiner(PROMPTS, image=ours_latents, denoising_start=0.7, sampler=sampler,
                   output_type="np", callback_on_step_end=lambda i, t, x: seen.append(t),
                   **STEPS).images  # fmt: skip
    assert seen == [201, 1]
    parity(f"SDXL base -> refiner at 0.7: {sampler} (pixels)", ours, expected, PIXEL_BAR)
    assert np.abs(ours - expected).max() <= PIXEL_BAR


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [4, 25])
def test_denoising_window_counts_as_diffusers(spacing, steps):
    """Step counts of diffusers' cutoffs: base keeps t >= cutoff, the refiner runs t < cutoff."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  steps_offset=1, timestep_spacing=spacing)  # fmt: skip
    spec = DiffusionSpec(linear_start=0.00085, linear_end=0.012, timestep_spacing=spacing,
                         steps_offset=1)  # fmt: skip
    schedule = schedule_from_spec(spec)
    for sampler, cls in (("euler", diffusers.EulerDiscreteScheduler),
                         ("ddim", diffusers.DDIMScheduler)):  # fmt: skip
        scheduler = cls(**config)
        scheduler.set_timesteps(steps)
        t = scheduler.timesteps.numpy()
        full = sampler_plans.sampler_plan(sampler, spec, 1000, steps, from_image=True)
        for fraction in (0.5, 0.8):
            cutoff = int(round(1000 - fraction * 1000))
            for kind, kept in (("end", t[t >= cutoff]), ("start", t[t < cutoff])):
                if not kept.size:  # diffusers would run no step: an error here
                    with pytest.raises(ValueError, match="leave none of the"):
                        sampler_plans.denoising_window(full, schedule, 1000, **{kind: fraction})
                    continue
                window = sampler_plans.denoising_window(full, schedule, 1000, **{kind: fraction})
                visited = sampler_plans.visited_timesteps(window, schedule)
                np.testing.assert_allclose(visited, kept, atol=1e-3)
            # img2img (strength 0.6) + denoising_end: diffusers filters its sliced timesteps
            first = strength_slice(steps, 0.6)
            kept = t[first:][t[first:] >= cutoff]
            sliced = sampler_plans.sampler_plan(sampler, spec, 1000, steps, first, from_image=True)
            if kept.size:
                window = sampler_plans.denoising_window(sliced, schedule, 1000, end=fraction)
                visited = sampler_plans.visited_timesteps(window, schedule)
                np.testing.assert_allclose(visited, kept, atol=1e-3)


def test_sdxl_argument_errors(pipes):
    base, refiner = pipes
    with pytest.raises(ValueError, match="aesthetic_score does not apply"):
        base("a cat", aesthetic_score=6.0)
    with pytest.raises(ValueError, match="target_size does not apply"):
        refiner("a cat", image=_image(), strength=0.5, target_size=(16, 16))
    with pytest.raises(ValueError, match="original_size must be a"):
        base("a cat", original_size=(16,))
    with pytest.raises(ValueError, match="denoising_start does not apply to plms"):
        refiner("a cat", image=np.zeros((1, 8, 8, 4), np.float32), denoising_start=0.7,
                sampler="plms")
    with pytest.raises(ValueError, match="denoising_start continues latents"):
        refiner("a cat", image=_image(), denoising_start=0.7)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        base("a cat", denoising_end=1.5)
    with pytest.raises(ValueError, match="leave none of the 5 steps"):
        base("a cat", num_inference_steps=5, denoising_end=0.05)
    with pytest.raises(ValueError, match="prompt_embeds needs pooled_prompt_embeds too"):
        base(prompt_embeds=np.zeros((1, 77, 80), np.float32))
    with pytest.raises(ValueError, match="clip_skip must be an int in"):
        base("a cat", clip_skip=2)  # encoder 1 has 2 layers, 1 already skipped


def test_micro_conditioning_needs_sdxl(tmp_path):
    folder = tmp_path / "sd"
    sd_pipeline().save_pretrained(folder)
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="prompt_2 applies to SDXL"):
        pipe("a cat", prompt_2="a dog")
    with pytest.raises(ValueError, match="original_size: for SDXL checkpoints only"):
        pipe("a cat", original_size=(16, 16))


def test_sample_cli_takes_sdxl_flags(folders, tmp_path, capsys):
    base = folders[0]
    common = ["--checkpoint", base, "--prompt", "a cat", "--steps", "2", "--n", "1", "--seed", "3",
              "--sampler", "euler", "--no-progress"]  # fmt: skip
    sizes = ["--original-size", "1024", "768", "--crop-top-left", "8", "0"]
    written = {}
    for name, extra in (("plain", []), ("sized", sizes)):
        code = sampling_cli.main([str(a) for a in [*common, *extra, "--out", tmp_path / name]])
        assert code == 0, capsys.readouterr().err
        written[name] = Image.open(tmp_path / name / "00.png")
    assert '"original_size": [1024, 768]' in written["sized"].info["parameters"]
    assert '"crop_top_left": [8, 0]' in written["sized"].info["parameters"]
    plain, sized = (np.asarray(written[k], np.float32) for k in ("plain", "sized"))
    assert np.abs(plain - sized).max() > 2  # the micro-conditioning reached the model
    capsys.readouterr()
    code = sampling_cli.main([str(a) for a in [*common, "--aesthetic-score", "6",
                                                "--out", tmp_path / "bad"]])  # fmt: skip
    assert code == 2
    assert "error: --aesthetic-score does not apply" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
