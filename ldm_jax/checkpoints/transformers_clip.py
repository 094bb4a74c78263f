"""Exact key table: transformers `CLIPTextModel` state dict <-> `CLIPTextTransformer` params
(and `CLIPTextModelWithProjection`'s: the same plus `text_projection.weight` beside
`text_model.`, when the config has a projection_dim).

Two layouts exist for the same tensors. Hub folders, older transformers and CompVis single files
(after stripping `cond_stage_model.transformer.`) prefix every key with `text_model.`;
transformers >= 5.6 (5.24 here) flattened the model and saves without it. Loading detects which
one is present; exporting writes whichever the caller asks for (the prefix-free one by default,
which transformers 5.x saves and loads).
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import KeyTable, Transform, key_map, layer_maps, norm_maps
from ldm_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from ldm_jax.models.params import abstract_params

TEXT_MODEL_PREFIX = "text_model."
LAYOUTS = (TEXT_MODEL_PREFIX, "")  # the two accepted key prefixes
_PROBE = "embeddings.token_embedding.weight"


def clip_text_key_table(config: CLIPTextConfig, prefix: str = "") -> KeyTable:
    """Every tensor of an HF CLIPTextModel with `config`, keys starting with `prefix`."""
    p = prefix
    entries = [
        key_map(f"{p}embeddings.token_embedding.weight", "token_embedding/embedding"),
        key_map(f"{p}embeddings.position_embedding.weight", "position_embedding/embedding"),
    ]
    for i in range(config.num_layers):
        t, f = f"{p}encoder.layers.{i}.", f"layers_{i}/"
        for ours, theirs in (
            ("q", "q_proj"),
            ("k", "k_proj"),
            ("v", "v_proj"),
            ("out", "out_proj"),
        ):
            entries += layer_maps(f"{t}self_attn.{theirs}", f"{f}attn/{ours}", Transform.LINEAR)
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            entries += norm_maps(f"{t}{theirs}", f"{f}{ours}")
        for fc in ("fc1", "fc2"):
            entries += layer_maps(f"{t}mlp.{fc}", f"{f}{fc}", Transform.LINEAR)
    entries += norm_maps(f"{p}final_layer_norm", "final_norm")
    if config.projection_dim is not None:  # CLIPTextModelWithProjection: beside `text_model`
        outer = p.removesuffix(TEXT_MODEL_PREFIX)
        entries += layer_maps(
            f"{outer}text_projection", "text_projection", Transform.LINEAR, bias=False
        )
    # position_ids is a non-persistent buffer that older transformers versions still saved.
    return KeyTable(entries, ignorable=[f"{p}embeddings.position_ids"])


def detect_prefix(state_dict: Mapping[str, Any]) -> str:
    """The key prefix ("text_model." or "") of an HF CLIPTextModel state dict."""
    found = [prefix for prefix in LAYOUTS if prefix + _PROBE in state_dict]
    if len(found) == 1:
        return found[0]
    sample = ", ".join(sorted(state_dict)[:5])
    if found:
        raise CheckpointMismatchError(
            "state dict holds both the 'text_model.'-prefixed and the unprefixed CLIP text layout"
        )
    raise CheckpointMismatchError(
        f"not a CLIP text-model state dict: neither {TEXT_MODEL_PREFIX + _PROBE!r} nor "
        f"{_PROBE!r} is present (first keys: {sample})"
    )


def clip_text_abstract_params(config: CLIPTextConfig) -> Any:
    ids = jnp.zeros((1, config.max_length), jnp.int32)
    return abstract_params(CLIPTextTransformer(config), ids)


def clip_text_from_torch(
    state_dict: Mapping[str, Any], config: CLIPTextConfig, *, prefix: str | None = None, dtype=None
) -> dict:
    """HF CLIPTextModel state dict (numpy-convertible values) -> CLIPTextTransformer params.

    `prefix=None` detects the layout; pass it explicitly for other wrappers.
    """
    prefix = detect_prefix(state_dict) if prefix is None else prefix
    table = clip_text_key_table(config, prefix)
    return table.to_flax(state_dict, clip_text_abstract_params(config), dtype=dtype)


def clip_text_to_torch(params: Any, config: CLIPTextConfig, *, prefix: str = "") -> dict:
    """CLIPTextTransformer params -> HF CLIPTextModel state dict of numpy arrays."""
    return clip_text_key_table(config, prefix).to_torch(params)
