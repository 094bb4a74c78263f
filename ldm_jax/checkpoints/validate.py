"""Checks on untrusted configs before any shape is built from them.

A diffusers `config.json`, a scheduler config or the spec stored in a `.safetensors` file is data
from whoever made the file: field types and ranges are checked first (one error naming the file,
the field and what is allowed, not a TypeError deep in a constructor), then the layer counts and
widths a spec declares are bounded by the tensors the file actually holds, so a file that claims a
text encoder of 10^6 layers fails at once instead of tracing a network of that size.
"""

import math
from collections.abc import Mapping
from typing import Any

from ldm_jax.checkpoints.errors import ArchitectureError
from ldm_jax.spec import MAX_SPEC_INT

_MAX_LIST = 64


def _is_int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_SPEC_INT


def _is_float(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_ints(value: Any) -> bool:
    return isinstance(value, list) and 0 < len(value) <= _MAX_LIST and all(map(_is_int, value))


def _is_strs(value: Any) -> bool:
    ok = isinstance(value, list) and 0 < len(value) <= _MAX_LIST
    return ok and all(isinstance(v, str) for v in value)


def _is_bools(value: Any) -> bool:
    ok = isinstance(value, list) and len(value) <= _MAX_LIST
    return ok and all(isinstance(v, bool) for v in value)


# kind -> (test, what is allowed); "?" suffix: null is allowed too.
_KINDS = {
    "int": (_is_int, f"an integer in [0, {MAX_SPEC_INT}]"),
    "float": (_is_float, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "ints": (_is_ints, f"a list of 1 to {_MAX_LIST} integers in [0, {MAX_SPEC_INT}]"),
    "strs": (_is_strs, f"a list of 1 to {_MAX_LIST} strings"),
    "int|ints": (lambda v: _is_int(v) or _is_ints(v), "an integer or a list of integers"),
    "bool|bools": (lambda v: isinstance(v, bool) or _is_bools(v), "a bool or a list of bools"),
}

UNET_FIELDS = {
    "in_channels": "int",
    "out_channels": "int",
    "block_out_channels": "ints",
    "layers_per_block": "int|ints",
    "down_block_types": "strs",
    "up_block_types": "strs",
    "mid_block_type": "str?",
    "attention_head_dim": "int|ints?",
    "num_attention_heads": "int|ints?",
    "cross_attention_dim": "int|ints?",
    "transformer_layers_per_block": "int|ints",
    "use_linear_projection": "bool",
    "only_cross_attention": "bool|bools",
    "mid_block_only_cross_attention": "bool?",
    "upcast_attention": "bool",
    "resnet_time_scale_shift": "str",
    "class_embed_type": "str?",
    "num_class_embeds": "int?",
    "projection_class_embeddings_input_dim": "int?",
    "downsample_type": "str?",
    "upsample_type": "str?",
    "norm_num_groups": "int?",  # null: diffusers' per-block groups, refused with its own error
    "attn_norm_num_groups": "int?",
    "sample_size": "int|ints?",
    "dropout": "float",
}
AUTOENCODER_FIELDS = {
    "in_channels": "int",
    "out_channels": "int",
    "latent_channels": "int",
    "block_out_channels": "ints",
    "layers_per_block": "int",
    "down_block_types": "strs",
    "up_block_types": "strs",
    "sample_size": "int|ints?",
    "num_vq_embeddings": "int",
    "vq_embed_dim": "int?",
    "scaling_factor": "float",
    "mid_block_add_attention": "bool",
    "norm_num_groups": "int",
}
CLIP_TEXT_FIELDS = {
    "vocab_size": "int",
    "max_position_embeddings": "int",
    "hidden_size": "int",
    "num_hidden_layers": "int",
    "num_attention_heads": "int",
    "intermediate_size": "int",
    "hidden_act": "str",
    "layer_norm_eps": "float",
    "eos_token_id": "int",
    "architectures": "strs?",
}
LDM_BERT_FIELDS = {
    "vocab_size": "int",
    "max_position_embeddings": "int",
    "d_model": "int",
    "encoder_layers": "int",
    "encoder_attention_heads": "int",
    "head_dim": "int",
    "encoder_ffn_dim": "int",
    "activation_function": "str",
    "dropout": "float",
}
SCHEDULER_FIELDS = {
    "num_train_timesteps": "int",
    "beta_start": "float",
    "beta_end": "float",
    "beta_schedule": "str",
    "prediction_type": "str",
    "timestep_spacing": "str",
}  # steps_offset and set_alpha_to_one: DiffusionSpec checks them
# Fields that must be at least 1 when present (a size of 0 is no network).
_POSITIVE = {
    "block_out_channels",
    "num_train_timesteps",
    "hidden_size",
    "num_attention_heads",
    "encoder_attention_heads",
    "head_dim",
    "d_model",
    "latent_channels",
    "norm_num_groups",
    "attn_norm_num_groups",
}


def check_fields(config: Mapping[str, Any], fields: Mapping[str, str], source: Any) -> None:
    """ArchitectureError naming `source`, the field and what is allowed, for the first field of
    `config` listed in `fields` whose value has the wrong type or range (absent ones are fine)."""
    for name, kind in fields.items():
        if name not in config:
            continue
        value = config[name]
        optional = kind.endswith("?")
        if optional and value is None:
            continue
        test, allowed = _KINDS[kind.rstrip("?")]
        ok = test(value)
        if ok and name in _POSITIVE:
            ok = all(v >= 1 for v in (value if isinstance(value, list) else [value]))
            allowed += " (at least 1)"
        if not ok:
            text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ArchitectureError(
                f"{source}: {name}={text} is not allowed; allowed: "
                f"{allowed}{' or null' if optional else ''}"
            )


def _total(value: Any) -> int:
    return sum(value) if isinstance(value, tuple) else value


def declared_blocks(config: Any) -> dict[str, int]:
    """Lower bounds on the number of layers (each with at least one tensor) a network config
    declares, by the field that declares them."""
    from ldm_jax.models.autoencoder import AutoencoderConfig
    from ldm_jax.models.unet import UNetConfig

    if isinstance(config, UNetConfig):
        levels = len(config.channel_mult)
        res = config.num_res_blocks
        res_total = sum(res) if isinstance(res, tuple) else res * levels
        depth = config.transformer_depth
        depth = max(depth) if isinstance(depth, tuple) else depth
        attention = bool(config.attention_resolutions) and depth > 0
        return {
            "channel_mult levels": levels,
            "num_res_blocks x levels x (1 + transformer_depth)": res_total
            * (1 + depth if attention else 1),
        }
    if isinstance(config, AutoencoderConfig):
        return {
            "ch_mult levels": len(config.ch_mult),
            "num_res_blocks x levels": config.num_res_blocks * len(config.ch_mult),
        }
    counts = {}
    for name in ("num_layers", "n_stages"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            counts[name] = value
    return counts


_WIDTHS = ("model_channels", "ch", "width", "mlp_dim", "context_dim", "embed_dim", "n_embed")


def check_against_tensors(config: Any, tensors: Mapping[str, Any], source: Any) -> None:
    """ArchitectureError when `config` declares more layers than `tensors` (a lazy state dict with
    `shape(key)`) has tensors, or a width no tensor is large enough to hold: checked before the
    network is traced, so a lying file cannot make the loader build a huge one."""
    count = len(tensors)
    for what, blocks in declared_blocks(config).items():
        if blocks > count:
            raise ArchitectureError(
                f"{source}: the config declares {blocks} layers ({type(config).__name__} "
                f"{what}) but the weights hold only {count} tensors; the config does not "
                "describe these weights"
            )
    largest = 0
    for key in tensors:
        largest = max(largest, math.prod(tensors.shape(key)))
    for name in _WIDTHS:
        value = getattr(config, name, None)
        if type(value) is int and value > largest:
            raise ArchitectureError(
                f"{source}: the config declares {type(config).__name__}.{name}={value} but the "
                f"largest tensor in the weights has {largest} elements; the config does not "
                "describe these weights"
            )
