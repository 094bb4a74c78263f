"""The pipeline call as diffusers users know it: images per prompt, output types and the result
object, per-image seeds, the step callback, prompt embeddings, clip_skip, batch padding, and
that none of these values recompiles (tiny random SD model)."""

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from support.tiny_pipelines import sd_pipeline

from ldm_jax.latent_diffusion import encode_condition
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline, PipelineOutput, sampler_iterations

PIXEL_BAR = 2 / 255
STEPS = 3
SAME = 2e-4  # one image alone vs in a batch: the same noise, fp32 batch-size rounding only


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api") / "sd"
    sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(folder):
    return LatentDiffusionPipeline.from_pretrained(folder)


def _call(pipe, prompt="a red cube", **kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(prompt, **kwargs)


def test_images_per_prompt_seeds_and_reproduction(pipe):
    out = _call(pipe, ["a red cube", "a blue ball"], num_images_per_prompt=2, seed=7)
    assert isinstance(out, PipelineOutput) and out.images.shape == (4, 16, 16, 3)
    assert out.seeds == [7, 8, 9, 10]
    # the same prompt twice: other seeds, other images; each image is its seed's alone
    assert np.abs(out.images[0] - out.images[1]).max() > 0.05
    for i in (1, 2):  # [cube, cube, ball, ball]
        alone = _call(pipe, ["a red cube", "a blue ball"][i // 2], seed=out.seeds[i])
        np.testing.assert_allclose(alone.images[0], out.images[i], atol=SAME)
    # a list of seeds, one per image; the largest seed wraps to 0 for the next image
    listed = _call(pipe, "a red cube", num_images_per_prompt=2, seed=[8, 7])
    np.testing.assert_allclose(listed.images[1], out.images[0], atol=SAME)
    assert _call(pipe, num_images_per_prompt=2, seed=2**32 - 1).seeds == [2**32 - 1, 0]


def test_seed_none_is_fresh_randomness_and_returned(pipe):
    first, second = _call(pipe), _call(pipe)
    assert first.seeds != second.seeds and len(first.seeds) == 1
    assert np.abs(first.images - second.images).max() > 0.05
    again = _call(pipe, seed=first.seeds[0])
    np.testing.assert_array_equal(again.images, first.images)


def test_output_types(pipe):
    kwargs = dict(seed=3)
    np_images = _call(pipe, **kwargs).images
    uint8 = _call(pipe, output_type="uint8", **kwargs).images
    pil = _call(pipe, output_type="pil", **kwargs).images
    latents = _call(pipe, output_type="latent", **kwargs).images
    assert np_images.dtype == np.float32 and 0 <= np_images.min() <= np_images.max() <= 1
    np.testing.assert_array_equal(uint8, np.round(np_images * 255).astype(np.uint8))
    assert isinstance(pil, list) and isinstance(pil[0], Image.Image)
    np.testing.assert_array_equal(np.asarray(pil[0]), uint8[0])
    assert latents.shape == (1, 8, 8, 4) and latents.dtype == np.float32
    # "latent" is the sampler's result before decoding: decoding it gives the "np" images
    z = latents / pipe.spec.diffusion.scale_factor
    decoded = pipe.first_stage.apply({"params": pipe.params["first_stage"]}, z, method="decode")
    np.testing.assert_allclose(np.clip(np.asarray(decoded) / 2 + 0.5, 0, 1), np_images, atol=1e-5)


def test_callback_on_step_end_sees_step_timestep_and_latents(pipe):
    for sampler in ("euler_karras", "heun"):  # fractional timesteps; 2 network calls per step
        calls = []

        def record(i, t, x, calls=calls):
            calls.append((i, t, x.shape))

        out = _call(pipe, ["a", "b"], sampler=sampler, seed=0, callback_on_step_end=record)
        steps = [i for i, _, _ in calls]
        assert steps == list(range(sampler_iterations(sampler, STEPS))), sampler
        timesteps = np.array([t for _, t, _ in calls])
        np.testing.assert_array_equal(timesteps, out.timesteps)
        assert np.all(np.diff(timesteps) <= 0) and timesteps[0] > timesteps[-1]
        assert {shape for _, _, shape in calls} == {(2, 8, 8, 4)}
    np.testing.assert_array_equal(pipe.timesteps("ddim", STEPS), [667, 334, 1])  # leading + 1


def test_prompt_embeds_replace_the_text_encoder(pipe):
    prompts, negatives = ["a red cube", "a blue ball"], ["blurry", ""]
    reference = _call(pipe, prompts, negative_prompt=negatives, seed=5).images

    def embed(texts):
        ids = np.asarray(pipe.tokenizer(texts), np.int32)
        cond = pipe.params["cond_stage"]
        return np.asarray(encode_condition(pipe.spec.cond_stage, pipe.cond_stage, cond, ids))

    out = _call(pipe, None, prompt_embeds=embed(prompts), negative_prompt_embeds=embed(negatives),
                seed=5)  # fmt: skip
    np.testing.assert_allclose(out.images, reference, atol=SAME)
    mixed = _call(pipe, None, prompt_embeds=embed(prompts), negative_prompt=negatives, seed=5)
    np.testing.assert_allclose(mixed.images, reference, atol=SAME)
    with pytest.raises(ValueError, match="pass prompt or prompt_embeds, not both"):
        _call(pipe, prompts, prompt_embeds=embed(prompts))
    width = pipe.spec.unet.context_dim
    with pytest.raises(ValueError, match=rf"prompt_embeds must be shaped \[batch, tokens, {width}"):
        _call(pipe, None, prompt_embeds=np.zeros((1, 77, width // 2), np.float32))
    with pytest.raises(ValueError, match="negative_prompt_embeds has shape"):
        _call(pipe, None, prompt_embeds=embed(prompts), negative_prompt_embeds=embed(["x"]))


def _diffusers_clip_skip_embeds(reference_pipe, text: str, clip_skip: int):
    """diffusers' encode_prompt with clip_skip: hidden_states[-(clip_skip + 1)], then the final
    LayerNorm. (Its own code reaches the norm through `text_model`, which transformers 5's
    CLIPTextModel no longer has, so the same two lines run here.)"""
    encoder = reference_pipe.text_encoder
    ids = reference_pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids  # fmt: skip
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return encoder.final_layer_norm(hidden)


def test_clip_skip_matches_diffusers(folder, pipe, parity):
    reference_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    reference_pipe.set_progress_bar_config(disable=True)
    latents_NHWC = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        reference = reference_pipe(
            prompt_embeds=_diffusers_clip_skip_embeds(reference_pipe, "a red cube", 1),
            negative_prompt_embeds=_diffusers_clip_skip_embeds(reference_pipe, "blurry", 1),
            num_inference_steps=STEPS,
            latents=torch.from_numpy(latents_NHWC.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        ).images  # fmt: skip
    kwargs = dict(negative_prompt="blurry", latents=latents_NHWC)
    ours = _call(pipe, clip_skip=1, **kwargs).images
    parity("pipeline: clip_skip=1, DDIM, CFG 7.5 (pixels)", ours, reference, PIXEL_BAR)
    assert np.abs(ours - reference).max() <= PIXEL_BAR
    assert np.abs(_call(pipe, **kwargs).images - reference).max() > PIXEL_BAR  # it matters
    with pytest.raises(ValueError, match=r"clip_skip must be an int in \[0, 1\]"):
        _call(pipe, clip_skip=2)  # the tiny encoder has 2 layers


def test_values_that_change_nothing_structural_never_recompile(pipe):
    _call(pipe, seed=0)
    compiled = pipe._generate._cache_size()
    _call(pipe, "another prompt", negative_prompt="x", seed=None, guidance_scale=3.0,
          guidance_rescale=0.7, clip_skip=1, output_type="pil")  # fmt: skip
    _call(pipe, seed=[5], output_type="uint8")
    assert pipe._generate._cache_size() == compiled


def test_padded_batch_equals_the_unpadded_one(folder, pipe):
    padded_pipe = LatentDiffusionPipeline.from_pretrained(folder, pad_batch=True)
    assert not pipe.pad_batch  # CPU default: the fake devices share the same cores
    calls = []
    out = _call(padded_pipe, ["a", "b", "c"], seed=1,
                callback_on_step_end=lambda i, t, x: calls.append(x.shape))  # fmt: skip
    assert out.images.shape == (3, 16, 16, 3) and set(calls) == {(3, 8, 8, 4)}
    assert padded_pipe._padded_batch(3) == jax.local_device_count() == 8  # sharded, one per device
    unpadded = _call(pipe, ["a", "b", "c"], seed=1).images
    np.testing.assert_allclose(out.images, unpadded, atol=SAME)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be an int >= 1"),
        (dict(seed=[1, 2]), "seed lists 2 seeds for 1 images"),
        (dict(seed=[1.5]), "seed must be an integer"),
        (dict(output_type="pt"), "unknown output_type 'pt'"),
        (dict(clip_skip=-1), r"clip_skip must be an int in \[0, 1\]"),
        (dict(prompt_embeds=np.full((1, 77, 64), np.nan, np.float32)), "must hold finite floats"),
    ],
)
def test_bad_arguments_are_refused_before_compiling(pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(pipe, "_generate", lambda *a, **k: pytest.fail("compiled"))
    prompt = None if "prompt_embeds" in kwargs else "x"
    with pytest.raises(ValueError, match=message):
        _call(pipe, prompt, **kwargs)


def test_save_pretrained_defaults_to_diffusers(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "again")
    assert (folder / "model_index.json").is_file()
    again = LatentDiffusionPipeline.from_pretrained(folder)
    np.testing.assert_array_equal(_call(again, seed=2).images, _call(pipe, seed=2).images)
