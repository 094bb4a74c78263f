"""CLIP text transformer: parity with transformers' CLIPTextModel, key tables, presets, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from references.torch_reference import randomize_

from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.transformers_clip import (
    TEXT_MODEL_PREFIX,
    clip_text_abstract_params,
    clip_text_from_torch,
    clip_text_to_torch,
    detect_prefix,
)
from ldm_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from ldm_jax.models.params import count_params
from ldm_jax.presets.text_encoders import clip_text_preset

VOCAB, MAX_LEN, LAYERS = 99, 16, 3


def tiny_config(activation="quick_gelu", eos_token_id=2, **overrides) -> CLIPTextConfig:
    fields = dict(
        vocab_size=VOCAB,
        max_length=MAX_LEN,
        width=32,
        num_layers=LAYERS,
        num_heads=4,
        mlp_dim=37,
        activation=activation,
        eos_token_id=eos_token_id,
    )
    return CLIPTextConfig(**(fields | overrides))


def hf_config(cfg: CLIPTextConfig, num_layers=None) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers if num_layers is None else num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=cfg.eos_token_id,
    )


def reference(cfg: CLIPTextConfig, seed=0) -> transformers.CLIPTextModel:
    model = transformers.CLIPTextModel(hf_config(cfg)).eval()
    randomize_(model, seed)
    return model


def token_ids(batch=2, tokens=MAX_LEN, eos=VOCAB - 1, pad=None, seed=0) -> np.ndarray:
    """Prompts ending in one EOS token, padded with `pad` (default: EOS, as SD's tokenizer pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, tokens))
    ids[ids == eos] = 3
    for b, length in enumerate(rng.integers(3, tokens - 1, size=batch)):
        ids[b, length] = eos
        ids[b, length + 1 :] = eos if pad is None else pad
    return ids


def state_dict_np(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, 50])
def test_parity_with_transformers(parity, activation, eos_token_id):
    cfg = tiny_config(activation, eos_token_id)
    torch_model = reference(cfg)
    if eos_token_id == 2:  # legacy argmax pooling: the EOS token has the largest id
        ids = token_ids(eos=VOCAB - 1)
    else:  # first-EOS pooling; larger ids elsewhere make argmax pooling pick another position
        ids = token_ids(eos=eos_token_id, pad=1)
        assert (ids.argmax(-1) != (ids == eos_token_id).argmax(-1)).all()
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
        penultimate = torch_model.final_layer_norm(ref.hidden_states[-2])
        embeddings_only = torch_model.final_layer_norm(ref.hidden_states[0])

    params = clip_text_from_torch(state_dict_np(torch_model), cfg)
    model = CLIPTextTransformer(cfg)
    out = model.apply({"params": params}, jnp.asarray(ids))
    tag = f"clip_text[{activation},eos={eos_token_id}]"
    parity(f"{tag} last_hidden_state", out.last_hidden_state, ref.last_hidden_state)
    parity(f"{tag} pooled", out.pooled, ref.pooler_output)
    skip1 = model.apply({"params": params}, jnp.asarray(ids), skip_last_layers=1)
    parity(f"{tag} penultimate", skip1.last_hidden_state, penultimate)
    skip_all = CLIPTextTransformer(tiny_config(activation, eos_token_id, skip_last_layers=LAYERS))
    out0 = skip_all.apply({"params": params}, jnp.asarray(ids))
    parity(f"{tag} skip all layers", out0.last_hidden_state, embeddings_only)


def test_penultimate_preset_equals_truncated_model(parity):
    """SD2 as CompVis runs it (N blocks, skip 1) == as diffusers ships it (N - 1 blocks)."""
    cfg = tiny_config("gelu", skip_last_layers=1)
    torch_model = reference(cfg)
    truncated = transformers.CLIPTextModel(hf_config(cfg, num_layers=LAYERS - 1)).eval()
    sd = torch_model.state_dict()
    truncated.load_state_dict({k: v for k, v in sd.items() if k in truncated.state_dict()})
    ids = token_ids()
    with torch.no_grad():
        ref = truncated(torch.from_numpy(ids))
    params = clip_text_from_torch(state_dict_np(torch_model), cfg)
    out = CLIPTextTransformer(cfg).apply({"params": params}, jnp.asarray(ids))
    parity("clip_text penultimate vs 23-layer layout", out.last_hidden_state, ref.last_hidden_state)
    parity("clip_text penultimate pooled", out.pooled, ref.pooler_output)


def test_padding_mask_parity(parity):
    cfg = tiny_config()
    torch_model = reference(cfg, seed=1)
    ids = token_ids(tokens=10, seed=1)
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    params = clip_text_from_torch(state_dict_np(torch_model), cfg)
    out = CLIPTextTransformer(cfg).apply(
        {"params": params}, jnp.asarray(ids), attention_mask_BT=jnp.asarray(mask)
    )
    parity("clip_text padded last_hidden_state", out.last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("prefix", [TEXT_MODEL_PREFIX, ""])
def test_key_table_round_trip_is_bit_exact(prefix):
    cfg = tiny_config()
    sd = {prefix + k: v for k, v in state_dict_np(reference(cfg)).items()}
    sd[prefix + "embeddings.position_ids"] = np.arange(MAX_LEN)[None]  # old files carry it
    assert detect_prefix(sd) == prefix
    params = clip_text_from_torch(sd, cfg)
    back = clip_text_to_torch(params, cfg, prefix=prefix)
    assert set(back) == set(sd) - {prefix + "embeddings.position_ids"}
    for key, value in back.items():
        assert value.dtype == sd[key].dtype and value.shape == sd[key].shape, key
        np.testing.assert_array_equal(value, sd[key], err_msg=key)


def test_exported_state_dict_loads_into_transformers(parity):
    cfg = tiny_config()
    params = clip_text_from_torch(state_dict_np(reference(cfg, seed=3)), cfg)
    fresh = transformers.CLIPTextModel(hf_config(cfg)).eval()
    exported = clip_text_to_torch(params, cfg)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    ids = token_ids(seed=3)
    with torch.no_grad():
        ref = fresh(torch.from_numpy(ids)).last_hidden_state
    ours = CLIPTextTransformer(cfg).apply({"params": params}, jnp.asarray(ids)).last_hidden_state
    parity("clip_text exported -> transformers", ours, ref)


def test_mismatched_state_dicts_raise():
    cfg = tiny_config()
    sd = state_dict_np(reference(cfg))
    missing = dict(sd)
    del missing["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointMismatchError, match="encoder.layers.1.mlp.fc2.bias"):
        clip_text_from_torch(missing, cfg)
    extra = sd | {"encoder.layers.9.mlp.fc2.bias": np.zeros(32, np.float32)}
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        clip_text_from_torch(extra, cfg)
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        clip_text_from_torch(sd, tiny_config(mlp_dim=40))
    with pytest.raises(CheckpointMismatchError, match="neither"):
        clip_text_from_torch({"model.encoder.weight": np.zeros(1)}, cfg)
    both = sd | {TEXT_MODEL_PREFIX + k: v for k, v in sd.items()}
    with pytest.raises(CheckpointMismatchError, match="both"):
        clip_text_from_torch(both, cfg)


def test_bad_inputs_raise():
    cfg = tiny_config()
    model = CLIPTextTransformer(cfg)
    params = jax.tree.map(jnp.zeros_like, clip_text_abstract_params(cfg))
    apply = lambda ids, **kw: model.apply({"params": params}, ids, **kw)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        apply(jnp.zeros((1, MAX_LEN + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"\[0, 98\]"):
        apply(jnp.full((1, 4), VOCAB, jnp.int32))
    with pytest.raises(ValueError, match=r"\[0, 98\]"):
        apply(jnp.full((1, 4), -1, jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        apply(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        apply(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match=r"skip_last_layers must be in \[0, 3\]"):
        apply(jnp.zeros((1, 4), jnp.int32), skip_last_layers=4)
    with pytest.raises(ValueError, match="attention_mask"):
        apply(jnp.zeros((1, 4), jnp.int32), attention_mask_BT=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="allowed"):
        tiny_config(activation="relu")
    with pytest.raises(ValueError, match="allowed"):
        clip_text_preset("clip-vit-b-32")


def test_jit_and_bf16_run_finite():
    cfg = tiny_config("gelu")
    params = clip_text_from_torch(state_dict_np(reference(cfg)), cfg)
    ids = jnp.asarray(token_ids())
    out32 = CLIPTextTransformer(cfg).apply({"params": params}, ids)
    model = CLIPTextTransformer(cfg, dtype=jnp.bfloat16)
    out = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert jnp.isfinite(out.last_hidden_state.astype(jnp.float32)).all()
    assert jnp.isfinite(out.pooled.astype(jnp.float32)).all()
    # bf16 keeps ~3 significant digits; a gross error (wrong layout, missing LN) would not.
    diff = jnp.abs(out.last_hidden_state.astype(jnp.float32) - out32.last_hidden_state).max()
    assert diff < 0.1 * jnp.abs(out32.last_hidden_state).max()


def test_causal_flag_controls_what_early_tokens_see():
    """CLIP is causal (token 0 ignores later tokens); causal=False lets every token see all."""
    ids = jnp.asarray(token_ids())
    changed = ids.at[:, -1].set((ids[:, -1] + 1) % VOCAB)
    for causal in (True, False):
        model = CLIPTextTransformer(tiny_config(causal=causal))
        params = model.init(jax.random.key(0), ids)["params"]

        def first_token(i, model=model, params=params):
            return model.apply({"params": params}, i).last_hidden_state[:, 0]

        moved = float(jnp.abs(first_token(ids) - first_token(changed)).max())
        assert (moved == 0.0) if causal else (moved > 1e-3), (causal, moved)


def _reference_count(cfg: CLIPTextConfig) -> int:
    with torch.device("meta"):
        model = transformers.CLIPTextModel(hf_config(cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("clip-vit-l-14", 123_060_480),
        ("openclip-vit-h-14", None),
        ("openclip-vit-h-14-diffusers", None),
    ],
)
def test_preset_parameter_counts(name, expected):
    cfg = clip_text_preset(name)
    ours = count_params(clip_text_abstract_params(cfg))
    assert ours == _reference_count(cfg)
    if expected is not None:
        assert ours == expected
