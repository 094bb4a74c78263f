"""SDXL sampling from precomputed text embeddings (diffusers' prompt_embeds [B, S, D],
pooled_prompt_embeds [B, P] and the negative pair) against diffusers' StableDiffusionXLPipeline
given the same embeddings and noise (tiny, random weights, fp32), and against our own pipeline
given the prompts the embeddings came from."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.tiny_pipelines import SDXL_PROJECTION, SDXL_TEXT_WIDTHS, sdxl_pipeline, torch_noise
from support.tiny_specs import SD1_LIKE

from ldm_jax.presets.sdxl import sdxl_preset
from ldm_jax.sampling.inputs import condition_inputs
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from ldm_jax.sampling.tasks import model_task
from ldm_jax.tokenizers.sdxl import SDXLTokenizers

PIXEL_BAR = 2 / 255
SAME_BAR = 1e-5  # prompt vs embeddings of that prompt, both ours
PROMPTS = ["a photo of a cat", "an oil painting of a harbour"]
NEGATIVES = ["blurry", "low quality"]
WIDTH = sum(SDXL_TEXT_WIDTHS)  # 32 + 48: the context is both encoders' outputs side by side
STEPS = dict(num_inference_steps=4, guidance_scale=5.0)
SIZES = dict(original_size=(1024, 768), crops_coords_top_left=(64, 32))  # from the call
NOISE = torch_noise((2, 4, 8, 8), seed=0)[1]  # 16 x 16 pixels; diffusers: seed 0


@pytest.fixture(scope="module")
def reference() -> diffusers.StableDiffusionXLPipeline:
    reference = sdxl_pipeline()
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture(scope="module")
def pipe(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl_embeds") / "base"
    reference.save_pretrained(path)
    return LatentDiffusionPipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def embeds(reference):
    """diffusers' encode_prompt: (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
    negative_pooled_prompt_embeds) of PROMPTS / NEGATIVES, as torch tensors."""
    with torch.no_grad():
        return reference.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVES
        )


def _kwargs(embeds, negative: bool = True) -> dict:
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")  # fmt: skip
    kwargs = dict(zip(names, embeds, strict=True))
    if not negative:
        del kwargs["negative_prompt_embeds"], kwargs["negative_pooled_prompt_embeds"]
    return kwargs


def _diffusers(reference, **kwargs) -> np.ndarray:
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        out = reference(generator=generator, output_type="np", **STEPS, **SIZES, **kwargs)
    return out.images


def _ours(pipe, **kwargs) -> np.ndarray:
    kwargs = {k: v.numpy() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    return pipe(latents=NOISE, sampler="euler", output_type="np", **STEPS, **SIZES, **kwargs).images


def _our_embeds(pipe, texts):
    """(context [B, 77, 80], pooled [B, 16]) from our own text encoders, jitted as in the
    pipeline (eagerly, float rounding differs by ~2e-7 relative: ~1e-5 in these pixels)."""

    @jax.jit
    def encode(params, ids):
        outputs = pipe.modules["cond_stage"].apply({"params": params}, ids)
        context = jnp.concatenate([out.last_hidden_state for out in outputs], axis=-1)
        return context, outputs[-1].text_embeds

    ids = tuple(jnp.asarray(tok(texts), jnp.int32) for tok in pipe.tokenizer.tokenizers)
    return tuple(np.asarray(x) for x in encode(pipe.params["cond_stage"], ids))


def _check(parity, name, ours, expected) -> float:
    error = float(np.abs(ours - expected).max())
    parity(f"{name} (pixels; max abs {error:.2e})", ours, expected, PIXEL_BAR)
    assert error <= PIXEL_BAR, f"{name}: max abs error {error:.3e}"
    return error


def test_embeds_match_diffusers(pipe, reference, embeds, parity):
    """All four embeddings given; the prompt's alone (an absent negative is zeros:
    force_zeros_for_empty_prompt); with a negative prompt encoded. New embeddings (zeros
    included) reuse the compiled function."""
    assert embeds[0].shape == (2, 77, WIDTH) and embeds[2].shape == (2, SDXL_PROJECTION)
    expected = _diffusers(reference, **_kwargs(embeds))
    ours = _ours(pipe, **_kwargs(embeds))
    compiled = pipe._generate._cache_size()
    _check(parity, "SDXL embeds: all four given, euler CFG 5", ours, expected)
    expected_zeros = _diffusers(reference, **_kwargs(embeds, negative=False))
    ours_zeros = _ours(pipe, **_kwargs(embeds, negative=False))
    _check(parity, "SDXL embeds: prompt's only, zero negative", ours_zeros, expected_zeros)
    assert np.abs(expected_zeros - expected).max() > 10 * PIXEL_BAR  # the negative matters
    assert pipe._generate._cache_size() == compiled  # the zeros are embeddings too: no new compile
    mixed = dict(negative_prompt=NEGATIVES, **_kwargs(embeds, negative=False))
    ours_mixed = _ours(pipe, **mixed)
    _check(parity, "SDXL embeds: prompt's given, negative prompt encoded", ours_mixed,
           _diffusers(reference, **mixed))  # fmt: skip
    assert np.abs(ours_mixed - ours).max() <= PIXEL_BAR  # the same negative, encoded here


def test_prompt_and_its_embeddings_give_the_same_images(pipe):
    from_text = _ours(pipe, prompt=PROMPTS, negative_prompt=NEGATIVES)
    context, pooled = _our_embeds(pipe, PROMPTS)
    neg_context, neg_pooled = _our_embeds(pipe, NEGATIVES)
    from_embeds = _ours(pipe, prompt_embeds=context, pooled_prompt_embeds=pooled,
                        negative_prompt_embeds=neg_context,
                        negative_pooled_prompt_embeds=neg_pooled)  # fmt: skip
    compiled = pipe._generate._cache_size()
    error = float(np.abs(from_text - from_embeds).max())
    print(f"SDXL prompt vs its embeddings (ours): max abs {error:.2e}")
    assert error <= SAME_BAR
    # no negative: zeros (force_zeros_for_empty_prompt) from either side's path
    zeros_text = _ours(pipe, prompt=PROMPTS)
    zeros_embeds = _ours(pipe, prompt_embeds=context, pooled_prompt_embeds=pooled)
    error = float(np.abs(zeros_text - zeros_embeds).max())
    print(f"SDXL prompt vs its embeddings, zero negative (ours): max abs {error:.2e}")
    assert error <= SAME_BAR
    assert np.abs(zeros_text - from_text).max() > 10 * PIXEL_BAR
    # other embeddings (another prompt) of the same shapes: no new compile, other images
    other = _ours(pipe, prompt_embeds=neg_context, pooled_prompt_embeds=neg_pooled,
                  negative_prompt_embeds=context, negative_pooled_prompt_embeds=pooled)  # fmt: skip
    assert np.abs(other - from_embeds).max() > 10 * PIXEL_BAR
    assert pipe._generate._cache_size() == compiled


def test_embeds_errors(pipe):
    context = np.zeros((2, 77, WIDTH), np.float32)
    pooled = np.zeros((2, SDXL_PROJECTION), np.float32)
    both = dict(prompt_embeds=context, pooled_prompt_embeds=pooled)
    cases = [
        (dict(prompt_embeds=context), "prompt_embeds needs pooled_prompt_embeds too"),
        (dict(pooled_prompt_embeds=pooled), "pooled_prompt_embeds needs prompt_embeds too"),
        (dict(**both, negative_prompt_embeds=context),
         "negative_prompt_embeds needs negative_pooled_prompt_embeds too"),
        (dict(prompt="a cat", **both), "pass prompt or prompt_embeds, not both"),
        (dict(prompt_2="a cat", **both), "pass prompt_2 or prompt_embeds, not both"),
        (dict(negative_prompt="x", negative_prompt_embeds=context,
              negative_pooled_prompt_embeds=pooled, **both),
         "pass negative_prompt or negative_prompt_embeds, not both"),
        (dict(prompt_embeds=context[..., :32], pooled_prompt_embeds=pooled),
         r"prompt_embeds must be shaped \[batch, tokens, 80\] \(the text encoders' hidden "
         r"states side by side: 32 \+ 48\), got \(2, 77, 32\)"),
        (dict(prompt_embeds=context, pooled_prompt_embeds=pooled[:, :8]),
         r"pooled_prompt_embeds must be shaped \[2, 16\] .*got \(2, 8\)"),
        (dict(prompt_embeds=context, pooled_prompt_embeds=pooled[:1]),
         r"pooled_prompt_embeds must be shaped \[2, 16\]"),
        (dict(**both, negative_prompt_embeds=context[:1], negative_pooled_prompt_embeds=pooled[:1]),
         r"they must match the prompt's: \(2, 77, 80\) / \(2, 16\)"),
        (dict(prompt_embeds=context[:, :70], pooled_prompt_embeds=pooled, negative_prompt="x"),
         r"prompt_embeds has 70 tokens but the negative prompt encodes to 77"),
        (dict(prompt_embeds=np.full_like(context, np.nan), pooled_prompt_embeds=pooled),
         "prompt_embeds must hold finite floats"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs)
    # longer embeddings (prompt weighting tools' 154 tokens): with negatives of their shape, or
    # zeros (host side here: nothing compiled); a 77-token negative is refused
    long = np.zeros((2, 154, WIDTH), np.float32)
    args = (pipe.task, pipe.spec, pipe.tokenizer, None, None, None, None, 5.0, long)
    for negative in (dict(negative_prompt_embeds=long, negative_pooled_prompt_embeds=pooled), {}):
        inputs, _ = condition_inputs(*args, pooled_prompt_embeds=pooled, **negative)
        assert inputs["neg_context"].shape == (2, 154, WIDTH)
    with pytest.raises(ValueError, match=r"match the prompt's: \(2, 154, 80\)"):
        pipe(prompt_embeds=long, pooled_prompt_embeds=pooled, negative_prompt_embeds=context,
             negative_pooled_prompt_embeds=pooled)  # fmt: skip


@pytest.mark.parametrize("name", ["sdxl-base", "sdxl-refiner"])
def test_published_shapes(name):
    """The released checkpoints' shapes (host side, nothing built): base context 768 + 1280 =
    2048 wide, refiner 1280 (bigG alone); pooled 1280. An absent negative: zeros for the base
    (force_zeros_for_empty_prompt), the encoded "" for the refiner (as diffusers)."""
    spec = sdxl_preset(name)
    width = 2048 if name == "sdxl-base" else 1280
    context = np.ones((1, 77, width), np.float32)
    pooled = np.ones((1, 1280), np.float32)
    tokenizer = SDXLTokenizers.from_packaged_vocab(len(spec.cond_stage.config.text_encoders))
    args = (model_task(spec), spec, tokenizer, None, None, None, None, 5.0)
    inputs, guided = condition_inputs(*args, context, pooled_prompt_embeds=pooled)
    assert guided and inputs["context"].shape == (1, 77, width)
    if name == "sdxl-base":
        assert sorted(inputs) == ["context", "neg_context", "neg_pooled", "pooled"]
        assert not inputs["neg_context"].any() and not inputs["neg_pooled"].any()
    else:
        assert sorted(inputs) == ["context", "neg_ids", "neg_keep", "pooled"]
        assert inputs["neg_ids"].shape == (1, 1, 77) and inputs["neg_keep"].tolist() == [1.0]
    other = 2048 + 1280 - width
    sides = "768 \\+ 1280" if width == 2048 else "1280"
    with pytest.raises(ValueError, match=rf"\[batch, tokens, {width}\] .*: {sides}\)"):
        condition_inputs(*args, np.ones((1, 77, other), np.float32), pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must be shaped \[1, 1280\]"):
        condition_inputs(*args, context, pooled_prompt_embeds=pooled[:, :768])
    with pytest.raises(ValueError, match="pooled_prompt_embeds applies to SDXL checkpoints"):
        condition_inputs(model_task(SD1_LIKE), SD1_LIKE, None, None, None, None, None, 5.0,
                         np.ones((1, 77, 64), np.float32), pooled_prompt_embeds=pooled)  # fmt: skip
