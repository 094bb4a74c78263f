"""Every sampler of SAMPLER_TABLE through the pipeline against diffusers' StableDiffusionPipeline
(and StableDiffusionImg2ImgPipeline) running that sampler's scheduler on the tiny random SD model:
pixels (CFG 7.5, negative prompts, the same initial latents), the callback's timesteps and count.

The stochastic samplers draw per-step noise from each image's key (seed + i, split, fold_in(step
key, step)); diffusers is given the same noise by replacing the ``randn_tensor`` its scheduler
module draws with. Each case compiles the pipeline once (~5 s on 2 cores), so every sampler runs
once per prediction type, eps and v at different step counts (4 and 7), instead of all four
(32 compilations in all).
"""

import importlib
import json
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
from PIL import Image
from support.tiny_pipelines import sd_pipeline, torch_noise

from ldm_jax.sampler_options import SAMPLER_INFO, SAMPLER_TABLE
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline, sampler_iterations

PIXEL_BAR = 2 / 255  # acceptance: max |ours - diffusers| on [0, 1] images
PROMPTS = ["a photo of a cat", "an oil painting of a harbour"]
NEGATIVES = ["blurry", "low quality, jpeg artefacts"]
SEED = 11
LATENT_HWC = (8, 8, 4)
EPS, V = "epsilon", "v_prediction"
# diffusers' schedulers call np.array on torch tensors (numpy 2's copy-keyword notice)
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def _cases():
    """(sampler, prediction, spacing, steps): every sampler under the SD default spacing with
    both prediction types (PLMS: eps only), the step counts alternating between rows so that
    each prediction type meets both; three samplers also under "linspace" and "trailing"."""
    cases = []
    for index, info in enumerate(SAMPLER_TABLE):
        eps_steps, v_steps = (4, 7) if index % 2 == 0 else (7, 4)
        cases.append((info.name, EPS, "leading", eps_steps))
        if not info.epsilon_only:
            cases.append((info.name, V, "leading", v_steps))
    for name in ("euler", "dpm++_2m_karras", "unipc"):
        cases += [(name, EPS, "linspace", 7), (name, V, "trailing", 4)]
    return cases


CASES = _cases()


class Models:
    """Our pipeline and diffusers' for each (prediction type, timestep spacing), built once: the
    tiny SD folder with its scheduler config rewritten (eps as the SD 1.5 release: ends at abar_0;
    v: set_alpha_to_one as the SD 2 configs)."""

    def __init__(self, root):
        self.root = root
        self.base = root / "sd"
        sd_pipeline().save_pretrained(self.base)
        self.cache = {}

    def get(self, prediction: str, spacing: str):
        key = (prediction, spacing)
        if key not in self.cache:
            folder = self.root / f"sd-{prediction}-{spacing}"
            shutil.copytree(self.base, folder)
            config_file = folder / "scheduler" / "scheduler_config.json"
            config = json.loads(config_file.read_text())
            config.update(prediction_type=prediction, timestep_spacing=spacing, steps_offset=1,
                          set_alpha_to_one=prediction == V)  # fmt: skip
            config_file.write_text(json.dumps(config))
            ours = LatentDiffusionPipeline.from_pretrained(folder)
            diffusion = ours.spec.diffusion
            assert (diffusion.prediction_type, diffusion.timestep_spacing) == key
            reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
            reference.set_progress_bar_config(disable=True)
            self.cache[key] = (ours, reference, dict(reference.scheduler.config))
        return self.cache[key]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("samplers"))


def _scheduler(name: str, base_config: dict):
    """The diffusers scheduler of the table row, from the folder's config."""
    info = SAMPLER_INFO[name]
    kwargs = dict(info.diffusers_config)
    if info.karras:
        kwargs["use_karras_sigmas"] = True
    return getattr(diffusers, info.diffusers).from_config(base_config, **kwargs)


def _latents(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *LATENT_HWC)).astype(np.float32)


def _our_step_noise_NCHW(seed: int, batch: int, steps: int) -> list:
    """The pipeline's per-step noise of each step (image i: key PRNGKey(seed + i), split into
    (x_T key, step key), step n: normal(fold_in(step key, n))), as NCHW torch tensors."""
    noise_BNHWC = []
    for image in range(batch):
        _, step_key = jax.random.split(jax.random.PRNGKey(seed + image))
        draws = [jax.random.normal(jax.random.fold_in(step_key, n), LATENT_HWC, jnp.float32)
                 for n in range(steps)]  # fmt: skip
        noise_BNHWC.append(np.stack(draws))
    noise_NBCHW = np.stack(noise_BNHWC, axis=1).transpose(0, 1, 4, 2, 3)
    return [torch.from_numpy(np.ascontiguousarray(n_BCHW)) for n_BCHW in noise_NBCHW]


def _feed_noise(monkeypatch, scheduler, noise: list) -> list:
    """Make the scheduler's module draw `noise` in call order; returns the list of draws made."""
    module = importlib.import_module(type(scheduler).__module__)
    assert hasattr(module, "randn_tensor"), f"{module.__name__} draws no noise"
    drawn = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert len(drawn) < len(noise), "the scheduler drew more noise than there are steps"
        sample = noise[len(drawn)]
        assert tuple(shape) == tuple(sample.shape), (shape, sample.shape)
        drawn.append(tuple(shape))
        return sample.to(dtype or torch.float32)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return drawn


def _diffusers_run(pipe, scheduler, **kwargs):
    """diffusers' images (float NHWC in [0, 1]) and the timestep of every UNet call."""
    pipe.scheduler = scheduler
    seen = []

    def on_step_end(_pipe, i, t, callback_kwargs):
        seen.append(float(t))
        return {}

    with torch.no_grad():
        out = pipe(prompt=PROMPTS, negative_prompt=NEGATIVES, guidance_scale=7.5,
                   output_type="np", callback_on_step_end=on_step_end, **kwargs)  # fmt: skip
    return out.images, np.asarray(seen)


def _check_callback(name, steps, calls, output, reference_t, strength=None):
    """One callback per sampler iteration, at the scheduler's timesteps (Heun: diffusers calls
    the UNet twice per step, at t_i then t_(i+1); ours reports each step once, at t_i)."""
    assert [i for i, _, _ in calls] == list(range(sampler_iterations(name, steps, strength)))
    assert all(x.shape == (2, *LATENT_HWC) for _, _, x in calls)
    if SAMPLER_INFO[name].module == "heun":
        assert len(reference_t) == 2 * len(calls) - 1
        reference_t = reference_t[::2]
    ours_t = np.array([t for _, t, _ in calls])
    np.testing.assert_allclose(ours_t, reference_t, rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(output.timesteps), reference_t, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "name, prediction, spacing, steps", CASES, ids=lambda v: str(v).replace("_prediction", "")
)
def test_text_to_image_matches_diffusers(models, parity, monkeypatch, name, prediction, spacing,
                                         steps):  # fmt: skip
    ours_pipe, reference_pipe, config = models.get(prediction, spacing)
    scheduler = _scheduler(name, config)
    assert scheduler.config.timestep_spacing == spacing
    assert scheduler.config.prediction_type == prediction
    latents = _latents()
    drawn = None
    if SAMPLER_INFO[name].stochastic:
        drawn = _feed_noise(monkeypatch, scheduler, _our_step_noise_NCHW(SEED, 2, steps))
    latents_NCHW = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
    reference, reference_t = _diffusers_run(
        reference_pipe, scheduler, num_inference_steps=steps, latents=latents_NCHW
    )
    if drawn is not None:  # diffusers ran on our noise: one draw per step
        assert len(drawn) == steps
    calls = []
    out = ours_pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps,
                    guidance_scale=7.5, sampler=name, seed=SEED, latents=latents,
                    output_type="np", callback_on_step_end=lambda *a: calls.append(a))  # fmt: skip
    ours = out.images
    assert ours.shape == reference.shape == (2, 16, 16, 3)
    error = float(np.abs(ours - reference).max())
    label = f"pipeline {name}, {prediction}, {spacing}, {steps} steps (pixels)"
    print(f"{label}: max abs {error:.2e}")
    parity(label, ours, reference, PIXEL_BAR)
    assert error <= PIXEL_BAR, f"{label}: max abs {error:.3e} > 2/255"
    assert 0.2 < np.mean((reference > 0) & (reference < 1))  # not just saturated pixels
    _check_callback(name, steps, calls, out, reference_t)


def test_stochastic_noise_is_the_seeds(models):
    """The per-step noise fed to diffusers above is what the pipeline draws: another seed with
    the same initial latents changes the image, the same seed repeats it."""
    ours_pipe, _, _ = models.get(EPS, "leading")
    (steps,) = [n for name, p, s, n in CASES if (name, p, s) == ("euler_ancestral", EPS, "leading")]
    kwargs = dict(
        negative_prompt=NEGATIVES,
        num_inference_steps=steps,
        sampler="euler_ancestral",
        latents=_latents(),
        output_type="np",
        callback_on_step_end=lambda *a: None,
    )  # the parity case's compiled function
    a = ours_pipe(PROMPTS, seed=SEED, **kwargs).images
    b = ours_pipe(PROMPTS, seed=SEED + 5, **kwargs).images
    np.testing.assert_array_equal(ours_pipe(PROMPTS, seed=SEED, **kwargs).images, a)
    assert np.abs(a - b).max() > 10 * PIXEL_BAR


def _image(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "name, prediction", [("euler", V), ("heun", EPS), ("dpm++_2m_karras", V)]
)  # fmt: skip
def test_image_to_image_matches_diffusers(models, parity, monkeypatch, name, prediction):
    # diffusers samples the VAE posterior; ours takes its mean: give diffusers the mean too
    monkeypatch.setattr(
        img2img_module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode()
    )
    ours_pipe, reference_pipe, config = models.get(prediction, "leading")
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    steps, strength, image = 6, 0.6, _image()
    generator, noise = torch_noise((2, 4, 8, 8), seed=3)  # what diffusers adds to the image
    reference, reference_t = _diffusers_run(
        img2img, _scheduler(name, config), num_inference_steps=steps, strength=strength,
        image=image, generator=generator,
    )  # fmt: skip
    calls = []
    out = ours_pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps,
                    guidance_scale=7.5, sampler=name, seed=SEED, latents=noise, image=image,
                    strength=strength, output_type="np",
                    callback_on_step_end=lambda *a: calls.append(a))  # fmt: skip
    ours = out.images
    error = float(np.abs(ours - reference).max())
    label = f"pipeline img2img {name}, {prediction}, strength 0.6, {steps} steps (pixels)"
    print(f"{label}: max abs {error:.2e}")
    parity(label, ours, reference, PIXEL_BAR)
    assert error <= PIXEL_BAR, f"{label}: max abs {error:.3e} > 2/255"
    _check_callback(name, steps, calls, out, reference_t, strength)
    assert len(calls) == 3  # int(6 * 0.6) steps of the 6
