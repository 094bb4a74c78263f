"""SDXL textual inversion (clip_l / clip_g files) against diffusers, which loads each vector set
into its own text encoder and tokenizer (tiny base, saved and reloaded; Euler, CFG 5)."""

import diffusers
import numpy as np
import pytest
import torch
from support.ti_files import random_embedding, write_diffusers, write_sdxl
from support.tiny_pipelines import (
    SDXL_TEXT_WIDTHS,
    sdxl_pipeline,
    sdxl_refiner_pipeline,
    torch_noise,
)

from ldm_jax.checkpoints.textual_inversion import TextualInversionError
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline

PIXEL_BAR = 2 / 255
TOKEN = "<xl-style>"
PROMPTS = [f"a photo of a cat, {TOKEN}", "an oil painting of a harbour"]
STEPS = dict(num_inference_steps=5, guidance_scale=5.0)


def test_sdxl_base_matches_diffusers(tmp_path, parity):
    sdxl_pipeline().save_pretrained(tmp_path / "base")
    clip_l = random_embedding(2, SDXL_TEXT_WIDTHS[0], seed=3)
    clip_g = random_embedding(2, SDXL_TEXT_WIDTHS[1], seed=4)
    path = write_sdxl(tmp_path / f"{TOKEN}.safetensors", clip_l, clip_g)
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
    reference.set_progress_bar_config(disable=True)
    for vectors, encoder, tokenizer in (
        (clip_l, reference.text_encoder, reference.tokenizer),
        (clip_g, reference.text_encoder_2, reference.tokenizer_2),
    ):
        reference.load_textual_inversion(
            torch.from_numpy(vectors), token=TOKEN, text_encoder=encoder, tokenizer=tokenizer
        )
    generator, noise = torch_noise((2, 4, 8, 8), seed=0)
    with torch.no_grad():
        expected = reference(PROMPTS, generator=generator, output_type="np", **STEPS).images

    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "base")
    plain = pipe(PROMPTS, latents=noise, sampler="euler", output_type="np", **STEPS).images
    assert pipe.load_textual_inversion(path) == (TOKEN, f"{TOKEN}_1")
    for ours_tok, hf in zip(pipe.tokenizer.tokenizers, (reference.tokenizer, reference.tokenizer_2),
                            strict=True):  # fmt: skip
        expanded = reference.maybe_convert_prompt(PROMPTS, hf)
        ids = hf(expanded, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert ours_tok(PROMPTS).tolist() == ids
    ours = pipe(PROMPTS, latents=noise, sampler="euler", output_type="np", **STEPS).images
    error = float(np.abs(ours - expected).max())
    print(f"SDXL TI images: max |ours - diffusers| = {error:.2e} (x255 {error * 255:.2f})")
    parity("SDXL base with a 2-vector clip_l/clip_g embedding vs diffusers (pixels)", ours,
           expected, PIXEL_BAR)  # fmt: skip
    assert error <= PIXEL_BAR
    assert np.abs(plain - expected).max() > 10 * PIXEL_BAR  # the embedding matters
    sizes = [e.vocab_size for e in pipe.spec.cond_stage.config.text_encoders]
    assert sizes == [49410, 49410]

    # an SD 1.x/2.x file (one [n, D] set) is refused, naming what SDXL needs
    one = write_diffusers(tmp_path / "one.bin", clip_l, "<one>")
    with pytest.raises(TextualInversionError, match=r"\['clip_l', 'clip_g'\] vectors"):
        pipe.load_textual_inversion(one)
    pipe.unload_textual_inversion()
    again = pipe(PROMPTS, latents=noise, sampler="euler", output_type="np", **STEPS).images
    assert np.array_equal(again, plain)


def test_sdxl_refiner_takes_clip_g(tmp_path):
    """The refiner's one text encoder (OpenCLIP bigG) takes a file's clip_g vectors."""
    sdxl_refiner_pipeline().save_pretrained(tmp_path / "refiner")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "refiner")
    clip_l = random_embedding(3, SDXL_TEXT_WIDTHS[0], seed=5)
    clip_g = random_embedding(3, SDXL_TEXT_WIDTHS[1], seed=6)
    assert pipe.load_textual_inversion(write_sdxl(tmp_path / "s.safetensors", clip_l, clip_g),
                                       token="<s>") == ("<s>", "<s>_1", "<s>_2")  # fmt: skip
    table = pipe.params["cond_stage"]["encoder_0"]["token_embedding"]["embedding"]
    assert np.array_equal(np.asarray(table)[49408:], clip_g)
    (tokenizer,) = pipe.tokenizer.tokenizers
    assert tokenizer("<s>")[0, 1:5].tolist() == [49408, 49409, 49410, 49407]
    assert tokenizer.pad_token_id == 0  # bigG's padding kept
    pipe.unload_textual_inversion()
    assert pipe.tokenizer.tokenizers[0].vocab_size == 49408
