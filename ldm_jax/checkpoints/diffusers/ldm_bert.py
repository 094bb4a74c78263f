"""Exact key table: diffusers `LDMBertModel` state dict (the `bert` folder of
CompVis/ldm-text2im-large-256) <-> `LDMBert` params."""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ldm_jax.checkpoints.key_table import KeyTable, Transform, key_map
from ldm_jax.models.ldm_bert import LDMBert, LDMBertConfig
from ldm_jax.models.params import abstract_params

_LOGITS_KEYS = ("to_logits.weight", "to_logits.bias")


def ldm_bert_key_table(config: LDMBertConfig) -> KeyTable:
    """Every tensor of a diffusers LDMBertModel with `config`."""
    entries = [
        key_map("model.embed_tokens.weight", "token_embedding/embedding"),
        key_map("model.embed_positions.weight", "position_embedding/embedding"),
    ]
    for i in range(config.num_layers):
        t, f = f"model.layers.{i}.", f"layers_{i}/"
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):  # no bias
            entries.append(
                key_map(f"{t}self_attn.{theirs}.weight", f"{f}attn/{ours}/kernel", Transform.LINEAR)
            )
        entries += [
            key_map(f"{t}self_attn.out_proj.weight", f"{f}attn/out/kernel", Transform.LINEAR),
            key_map(f"{t}self_attn.out_proj.bias", f"{f}attn/out/bias"),
        ]
        for ours, theirs in (("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm")):
            entries += [
                key_map(f"{t}{theirs}.weight", f"{f}{ours}/scale"),
                key_map(f"{t}{theirs}.bias", f"{f}{ours}/bias"),
            ]
        for fc in ("fc1", "fc2"):
            entries += [
                key_map(f"{t}{fc}.weight", f"{f}{fc}/kernel", Transform.LINEAR),
                key_map(f"{t}{fc}.bias", f"{f}{fc}/bias"),
            ]
    entries += [
        key_map("model.layer_norm.weight", "final_norm/scale"),
        key_map("model.layer_norm.bias", "final_norm/bias"),
    ]
    if config.logits_head:
        entries += [
            key_map("to_logits.weight", "to_logits/kernel", Transform.LINEAR),
            key_map("to_logits.bias", "to_logits/bias"),
        ]
    # A headless model loads full checkpoints by dropping the unused head.
    return KeyTable(entries, ignorable=() if config.logits_head else _LOGITS_KEYS)


def ldm_bert_abstract_params(config: LDMBertConfig) -> Any:
    return abstract_params(LDMBert(config), jnp.zeros((1, config.max_length), jnp.int32))


def ldm_bert_from_torch(
    state_dict: Mapping[str, Any], config: LDMBertConfig, *, dtype=None
) -> dict:
    """diffusers LDMBertModel state dict (numpy-convertible values) -> LDMBert params."""
    table = ldm_bert_key_table(config)
    return table.to_flax(state_dict, ldm_bert_abstract_params(config), dtype=dtype)


def ldm_bert_to_torch(params: Any, config: LDMBertConfig) -> dict:
    """LDMBert params -> diffusers LDMBertModel state dict of numpy arrays."""
    return ldm_bert_key_table(config).to_torch(params)
