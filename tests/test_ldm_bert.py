"""LDMBert: parity with diffusers' LDMBertModel, key table, preset, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertConfig as DiffusersLDMBertConfig,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from references.torch_reference import randomize_

from ldm_jax.checkpoints.diffusers.ldm_bert import (
    ldm_bert_abstract_params,
    ldm_bert_from_torch,
    ldm_bert_to_torch,
)
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.models.ldm_bert import LDMBert, LDMBertConfig
from ldm_jax.models.params import count_params
from ldm_jax.presets.text_encoders import ldm_bert_preset

VOCAB, MAX_LEN = 101, 16


def tiny_config(**overrides) -> LDMBertConfig:
    fields = dict(
        vocab_size=VOCAB,
        max_length=MAX_LEN,
        width=32,
        num_layers=3,
        num_heads=4,
        head_dim=12,  # inner width 48 != width 32: catches a mixed-up out projection
        mlp_dim=40,
    )
    return LDMBertConfig(**(fields | overrides))


def hf_config(cfg: LDMBertConfig) -> DiffusersLDMBertConfig:
    return DiffusersLDMBertConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_length,
        encoder_layers=cfg.num_layers,
        encoder_ffn_dim=cfg.mlp_dim,
        encoder_attention_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        d_model=cfg.width,
        activation_function=cfg.activation,
    )


def reference(cfg: LDMBertConfig, seed=0) -> LDMBertModel:
    model = LDMBertModel(hf_config(cfg)).eval()
    randomize_(model, seed)
    return model


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def token_ids(batch=2, tokens=MAX_LEN, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, tokens))


def test_parity_with_diffusers(parity):
    cfg = tiny_config()
    torch_model = reference(cfg)
    ids = token_ids()
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids)).last_hidden_state
        ref_logits = torch_model.to_logits(ref)
        ref_masked = torch_model(
            torch.from_numpy(ids[:, :11]), attention_mask=torch.from_numpy(mask[:, :11])
        ).last_hidden_state

    params = ldm_bert_from_torch(state_dict_np(torch_model), cfg)
    model = LDMBert(cfg)
    hidden, logits = model.apply({"params": params}, jnp.asarray(ids), return_logits=True)
    parity("ldm_bert last_hidden_state", hidden, ref)
    parity("ldm_bert to_logits", logits, ref_logits)
    masked = model.apply(
        {"params": params}, jnp.asarray(ids[:, :11]), attention_mask_BT=jnp.asarray(mask[:, :11])
    )
    parity("ldm_bert padded last_hidden_state", masked, ref_masked)


def test_key_table_round_trip_is_bit_exact_and_loads_into_diffusers(parity):
    cfg = tiny_config()
    sd = state_dict_np(reference(cfg, seed=1))
    params = ldm_bert_from_torch(sd, cfg)
    back = ldm_bert_to_torch(params, cfg)
    assert set(back) == set(sd)
    for key, value in back.items():
        assert value.dtype == sd[key].dtype and value.shape == sd[key].shape, key
        np.testing.assert_array_equal(value, sd[key], err_msg=key)
    fresh = LDMBertModel(hf_config(cfg)).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    ids = token_ids(seed=1)
    with torch.no_grad():
        ref = fresh(torch.from_numpy(ids)).last_hidden_state
    parity("ldm_bert exported -> diffusers", LDMBert(cfg).apply({"params": params}, ids), ref)


def test_headless_config_drops_the_logits_head(parity):
    cfg = tiny_config(logits_head=False)
    torch_model = reference(cfg, seed=2)
    params = ldm_bert_from_torch(state_dict_np(torch_model), cfg)
    assert "to_logits" not in params
    ids = token_ids(seed=2)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids)).last_hidden_state
    parity("ldm_bert headless", LDMBert(cfg).apply({"params": params}, jnp.asarray(ids)), ref)
    with pytest.raises(ValueError, match="logits_head"):
        LDMBert(cfg).apply({"params": params}, jnp.asarray(ids), return_logits=True)


def test_mismatched_state_dicts_raise():
    cfg = tiny_config()
    sd = state_dict_np(reference(cfg))
    missing = {k: v for k, v in sd.items() if k != "model.layers.2.self_attn.q_proj.weight"}
    with pytest.raises(CheckpointMismatchError, match="model.layers.2.self_attn.q_proj.weight"):
        ldm_bert_from_torch(missing, cfg)
    with_bias = sd | {"model.layers.0.self_attn.q_proj.bias": np.zeros(48, np.float32)}
    with pytest.raises(CheckpointMismatchError, match="q_proj.bias"):
        ldm_bert_from_torch(with_bias, cfg)
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        ldm_bert_from_torch(sd, tiny_config(head_dim=8))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        ldm_bert_from_torch(sd, tiny_config(num_layers=4))


def test_bad_inputs_raise():
    cfg = tiny_config()
    model = LDMBert(cfg)
    params = jax.tree.map(jnp.zeros_like, ldm_bert_abstract_params(cfg))
    apply = lambda ids: model.apply({"params": params}, ids)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        apply(jnp.zeros((1, MAX_LEN + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        apply(jnp.full((2, 3), VOCAB, jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        apply(jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="allowed"):
        tiny_config(activation="swish")
    with pytest.raises(ValueError, match="allowed"):
        ldm_bert_preset("bert-base")


def test_dropout_and_bf16():
    cfg = tiny_config(dropout=0.5)
    params = ldm_bert_from_torch(state_dict_np(reference(cfg)), cfg)
    ids = jnp.asarray(token_ids())
    model = LDMBert(cfg)
    eval_out = model.apply({"params": params}, ids)
    train_out = model.apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    assert not np.allclose(eval_out, train_out)  # dropout is active only in training
    bf16 = LDMBert(cfg, dtype=jnp.bfloat16)
    out = jax.jit(lambda p, i: bf16.apply({"params": p}, i))(params, ids)
    assert out.dtype == jnp.bfloat16
    assert jnp.isfinite(out.astype(jnp.float32)).all()
    assert jnp.abs(out.astype(jnp.float32) - eval_out).max() < 0.1 * jnp.abs(eval_out).max()


def test_preset_parameter_count_matches_diffusers():
    cfg = ldm_bert_preset("ldm-bert-txt2img-1p4b")
    with torch.device("meta"):
        reference_model = LDMBertModel(hf_config(cfg))
    expected = sum(p.numel() for p in reference_model.parameters())
    assert count_params(ldm_bert_abstract_params(cfg)) == expected
