"""SDXL's text encoders: penultimate states without the final LayerNorm, bigG's projected pooled
output (transformers CLIPTextModelWithProjection), presets vs transformers' parameter counts."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from references.torch_reference import randomize_, state_dict_numpy

from ldm_jax.checkpoints.key_table import KeyTable
from ldm_jax.checkpoints.transformers_clip import (
    TEXT_MODEL_PREFIX,
    clip_text_abstract_params,
    clip_text_key_table,
)
from ldm_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from ldm_jax.models.params import count_params
from ldm_jax.presets.text_encoders import clip_text_preset

VOCAB, MAX_LEN, LAYERS = 99, 16, 3
TINY_BIGG = CLIPTextConfig(  # encoder 2's options at toy size
    vocab_size=VOCAB,
    max_length=MAX_LEN,
    width=32,
    num_layers=LAYERS,
    num_heads=4,
    mlp_dim=37,
    activation="gelu",
    skip_last_layers=1,
    final_norm_on_output=False,
    projection_dim=24,
)


def hf_config(cfg: CLIPTextConfig) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim or 512,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=cfg.eos_token_id,
    )


def projection_table(cfg: CLIPTextConfig) -> KeyTable:
    """CLIPTextModelWithProjection: the CLIPTextModel table under `text_model.` + the projection
    (`text_projection.weight`, which checkpoints/transformers_clip.py adds for projection_dim)."""
    table = clip_text_key_table(cfg, TEXT_MODEL_PREFIX)
    assert "text_projection.weight" in {e.torch_key for e in table.entries}
    return table


def token_ids(batch=2, pad=0, seed=0) -> np.ndarray:
    """Prompts ending in EOS (the largest id), padded with `pad` (SDXL's tokenizer_2: 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB - 1, size=(batch, MAX_LEN))
    for b, length in enumerate(rng.integers(3, MAX_LEN - 1, size=batch)):
        ids[b, length] = VOCAB - 1
        ids[b, length + 1 :] = pad
    return ids


def test_encoder_2_parity_with_clip_text_model_with_projection(parity):
    model = transformers.CLIPTextModelWithProjection(hf_config(TINY_BIGG)).eval()
    randomize_(model, seed=0)
    ids = token_ids()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    params = projection_table(TINY_BIGG).to_flax(
        state_dict_numpy(model), clip_text_abstract_params(TINY_BIGG)
    )
    out = CLIPTextTransformer(TINY_BIGG).apply({"params": params}, jnp.asarray(ids))
    # SDXL's context: hidden_states[-2] as is; its pooled input: text_embeds of the last layer
    parity("sdxl encoder 2 hidden_states[-2]", out.last_hidden_state, ref.hidden_states[-2])
    parity("sdxl encoder 2 text_embeds", out.text_embeds, ref.text_embeds)
    assert out.text_embeds.shape == (2, TINY_BIGG.projection_dim)
    # the default (SD) readout of the same weights: last layer, final LayerNorm
    full = dataclasses.replace(TINY_BIGG, skip_last_layers=0, final_norm_on_output=True)
    last = CLIPTextTransformer(full).apply({"params": params}, jnp.asarray(ids))
    parity("sdxl encoder 2 last_hidden_state", last.last_hidden_state, ref.last_hidden_state)
    parity("sdxl encoder 2 text_embeds (no skip)", last.text_embeds, ref.text_embeds)
    # the selected layer does not feed the projection: a different skip, the same text_embeds
    np.testing.assert_array_equal(last.text_embeds, out.text_embeds)


def test_encoder_1_penultimate_without_final_norm(parity):
    cfg = dataclasses.replace(TINY_BIGG, activation="quick_gelu", projection_dim=None)
    model = transformers.CLIPTextModel(hf_config(cfg)).eval()
    randomize_(model, seed=1)
    ids = token_ids(pad=VOCAB - 1, seed=1)  # tokenizer 1 pads with EOS
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    params = clip_text_key_table(cfg).to_flax(
        state_dict_numpy(model), clip_text_abstract_params(cfg)
    )
    out = CLIPTextTransformer(cfg).apply({"params": params}, jnp.asarray(ids))
    assert out.text_embeds is None
    parity("sdxl encoder 1 hidden_states[-2]", out.last_hidden_state, ref.hidden_states[-2])
    with torch.no_grad():  # pooled: final_norm of the selected layer at EOS, as before
        normed = model.final_layer_norm(ref.hidden_states[-2])
    eos = ids.argmax(-1)
    parity("sdxl encoder 1 pooled (selected layer)", out.pooled, normed[np.arange(2), eos])


@pytest.mark.parametrize(
    "name, reference, expected",
    [
        ("clip-vit-l-14-sdxl", transformers.CLIPTextModel, 123_060_480),
        ("openclip-vit-bigg-14", transformers.CLIPTextModelWithProjection, 694_659_840),
    ],
)
def test_preset_parameter_counts(name, reference, expected):
    cfg = clip_text_preset(name)
    with torch.device("meta"):
        model = reference(hf_config(cfg))
    ours = count_params(clip_text_abstract_params(cfg))
    assert ours == sum(p.numel() for p in model.parameters()) == expected


def test_bad_projection_dim_raises():
    with pytest.raises(ValueError, match="projection_dim must be None or an int >= 1"):
        dataclasses.replace(TINY_BIGG, projection_dim=0)
