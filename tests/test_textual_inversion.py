"""Textual inversion: the three file layouts, tokens and prompt expansion as diffusers', images
against diffusers' `load_textual_inversion` (tiny SD 1.x pipeline, saved and reloaded)."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.loaders import TextualInversionLoaderMixin
from support.ti_files import (
    random_embedding,
    write_a1111_pt,
    write_a1111_safetensors,
    write_diffusers,
)
from support.tiny_pipelines import TEXT_WIDTH, sd_pipeline

from ldm_jax.checkpoints.textual_inversion import TextualInversionError, read_textual_inversion
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from ldm_jax.tokenizers import CLIPTokenizer

PIXEL_BAR = 2 / 255
TOKEN = "<cat-toy>"
PROMPTS = [f"a photo of {TOKEN} on a beach, {TOKEN}", "an oil painting of a harbour"]
NEGATIVES = ["blurry", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti") / "sd"
    sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(folder):
    return LatentDiffusionPipeline.from_pretrained(folder)


def test_file_layouts(tmp_path):
    vectors = random_embedding(3, 8)
    pt = read_textual_inversion(write_a1111_pt(tmp_path / "a.pt", vectors, name="my-style"))
    civitai = write_a1111_safetensors(tmp_path / "civitai-x.safetensors", vectors)
    st = read_textual_inversion(civitai)
    bin_ = read_textual_inversion(write_diffusers(tmp_path / "learned_embeds.bin", vectors, "<k>"))
    one = read_textual_inversion(write_diffusers(tmp_path / "e.safetensors", vectors[0], "<o>"))
    assert (pt.token, st.token, bin_.token, one.token) == ("my-style", "civitai-x", "<k>", "<o>")
    for ti in (pt, st, bin_):
        assert np.array_equal(ti.vectors[""], vectors)
    assert bin_.tokens == ("<k>", "<k>_1", "<k>_2") and one.tokens == ("<o>",)
    assert read_textual_inversion(tmp_path / "a.pt", token="<t>").token == "<t>"
    assert read_textual_inversion(torch.from_numpy(vectors), token="<t>").num_vectors == 3
    sdxl = read_textual_inversion({"clip_l": np.ones((2, 8)), "clip_g": np.ones((2, 12))}, "<x>")
    assert sorted(sdxl.vectors) == ["clip_g", "clip_l"]
    with pytest.raises(TextualInversionError, match="needs token="):
        read_textual_inversion(vectors)
    with pytest.raises(TextualInversionError, match=r"unknown textual-inversion layout.*'a', 'b'"):
        read_textual_inversion({"a": vectors, "b": vectors})
    with pytest.raises(TextualInversionError, match="NaN or inf"):
        read_textual_inversion({"<n>": np.full((2, 8), np.inf)})
    with pytest.raises(TextualInversionError, match=r"shape \(1, 2, 8\)"):
        read_textual_inversion({"<n>": np.ones((1, 2, 8))})


@pytest.mark.parametrize("pad", ["clip", "openclip"])
def test_added_tokens_tokenize_as_diffusers(pad):
    base = CLIPTokenizer.for_cond_stage(pad)
    tokenizer = base.with_added_tokens([TOKEN, f"{TOKEN}_1", "<s>"])
    assert base.added_tokens == () and base.vocab_size == 49408  # the original is untouched
    assert [tokenizer.vocab[t] for t in tokenizer.added_tokens] == [49408, 49409, 49410]
    hf = CLIPTokenizer.for_cond_stage(pad).hf_tokenizer
    for token in tokenizer.added_tokens:
        hf.add_tokens(token)
    prompts = [*PROMPTS, "<s> and <S>, <cat-toy>_1 x<cat-toy>", "nothing added"]
    for prompt in prompts:
        expanded = TextualInversionLoaderMixin._maybe_convert_prompt(None, prompt, hf)
        assert tokenizer.expand_prompt(prompt) == expanded
        ids = hf(expanded, truncation=True, max_length=77)["input_ids"]
        ours = tokenizer(prompt)[0]
        assert ours[: len(ids)].tolist() == ids
        assert (ours[len(ids) :] == base.pad_token_id).all()  # padding unchanged
    assert 49409 in tokenizer(PROMPTS[0])[0]  # the second vector is used
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tokenizer.with_added_tokens(["<s>"])


def test_images_match_diffusers(folder, pipe, tmp_path, parity):
    """DDIM, CFG 7.5, 5 steps; a random 2-vector embedding used twice in a prompt."""
    vectors = random_embedding(2, TEXT_WIDTH, seed=1)
    path = write_diffusers(tmp_path / "learned_embeds.bin", vectors, TOKEN)
    reference_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    reference_pipe.set_progress_bar_config(disable=True)
    assert isinstance(reference_pipe.scheduler, diffusers.DDIMScheduler)
    reference_pipe.load_textual_inversion(str(path))
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    reference = reference_pipe(
        prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=7.5,
        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np",
    ).images  # fmt: skip
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=7.5,
                  latents=latents, output_type="np")  # fmt: skip
    plain = pipe(PROMPTS, **kwargs).images
    compiled, original = pipe._generate._cache_size(), pipe.params
    assert pipe.load_textual_inversion(path) == (TOKEN, f"{TOKEN}_1")
    try:
        hf = reference_pipe.tokenizer
        expanded = reference_pipe.maybe_convert_prompt(PROMPTS, hf)
        reference_ids = hf(expanded, padding="max_length", max_length=77, truncation=True)
        assert pipe.tokenizer(PROMPTS).tolist() == reference_ids["input_ids"]
        ours = pipe(PROMPTS, **kwargs).images
        error = float(np.abs(ours - reference).max())
        print(f"TI pipeline images: max |ours - diffusers| = {error:.2e} (x255 {error * 255:.2f})")
        assert error <= PIXEL_BAR
        parity("pipeline with a 2-vector textual inversion vs diffusers (pixels)", ours,
               reference, PIXEL_BAR)  # fmt: skip
        assert np.abs(plain - reference).max() > 10 * PIXEL_BAR  # the embedding matters
        assert pipe._generate._cache_size() == compiled + 1  # a new vocab size: one compile
    finally:
        pipe.unload_textual_inversion()
    assert pipe.tokenizer.added_tokens == () and pipe.spec.cond_stage.config.vocab_size == 49408
    table = original["cond_stage"]["token_embedding"]["embedding"]
    assert pipe.params["cond_stage"]["token_embedding"]["embedding"] is table
    assert np.array_equal(pipe(PROMPTS, **kwargs).images, plain)
    assert pipe._generate._cache_size() == compiled + 1  # the original size: cached


def test_formats_load_the_same_rows_and_errors_change_nothing(pipe, tmp_path):
    vectors = random_embedding(2, TEXT_WIDTH, seed=2)
    files = {
        "<a>": write_a1111_pt(tmp_path / "x.pt", vectors, name="<a>"),
        "<b>": write_a1111_safetensors(tmp_path / "<b>.safetensors", vectors),
        "<c>": write_diffusers(tmp_path / "learned_embeds.safetensors", vectors, "<c>"),
    }
    try:
        for token, path in files.items():
            assert pipe.load_textual_inversion(path) == (token, f"{token}_1")
        pipe.load_textual_inversion(vectors[0], token="<d>")
        rows = np.asarray(pipe.params["cond_stage"]["token_embedding"]["embedding"])[49408:]
        assert np.array_equal(rows, np.concatenate([vectors] * 3 + [vectors[:1]]))
        assert pipe.spec.cond_stage.config.vocab_size == 49408 + 7
        before = (pipe.params, pipe.tokenizer, pipe.spec)
        wide = random_embedding(1, 1024)
        bad = [
            (dict(path_or_array=wide, token="<w>"), "width 1024 does not fit .* 64"),
            (dict(path_or_array=np.full((1, TEXT_WIDTH), np.nan), token="<w>"), "NaN or inf"),
            (dict(path_or_array=files["<a>"]), r"\['<a>'.*already in the vocabulary"),
            (dict(path_or_array=vectors[:1], token="cat</w>"), "already in the vocabulary"),
            (dict(path_or_array={"k": vectors, "v": vectors}), r"layout, keys \['k', 'v'\]"),
        ]
        for kwargs, message in bad:
            with pytest.raises(TextualInversionError, match=message):
                pipe.load_textual_inversion(**kwargs)
        assert (pipe.params, pipe.tokenizer, pipe.spec) == before
        with pytest.raises(ValueError, match="unload_textual_inversion"):  # nothing written
            pipe.save_pretrained(tmp_path / "with-ti")
        assert not (tmp_path / "with-ti").exists()
    finally:
        pipe.unload_textual_inversion()
    assert pipe.spec.cond_stage.config.vocab_size == 49408
