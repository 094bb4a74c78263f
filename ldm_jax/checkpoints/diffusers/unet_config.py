"""diffusers UNet `config.json` -> `UNetConfig`: the exact inverse of `diffusers_unet_config`.

`diffusers_unet_config(unet_config_from_diffusers(c))` reproduces every argument of `c` that
`diffusers_unet_config` writes; the other direction returns a config that computes the same
function (attention_resolutions listed deepest first, as the CompVis yamls do; `legacy` False
for cross-attention UNets and the openaimodel default True otherwise, where it changes nothing).
Options diffusers has that openaimodel lacks must be at their defaults, or it is an error.
"""

from collections.abc import Mapping
from typing import Any

from ldm_jax.checkpoints.errors import ArchitectureError
from ldm_jax.models.unet import UNetConfig

_CROSS_DOWN, _CROSS_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
_ATTN_DOWN, _ATTN_UP = "AttnDownBlock2D", "AttnUpBlock2D"
# Arguments of either class that must keep these (default) values; a missing key is the default.
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "num_train_timesteps": None,
    "add_attention": True,
}
# Read below, or without effect on the parameters and the computation.
_READ = {
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "block_out_channels",
    "layers_per_block",
    "dropout",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "use_linear_projection",
    "only_cross_attention",
    "mid_block_only_cross_attention",
    "upcast_attention",
    "resnet_time_scale_shift",
    "class_embed_type",
    "num_class_embeds",
    "projection_class_embeddings_input_dim",
    "downsample_type",
    "upsample_type",
    "norm_num_groups",
    "attn_norm_num_groups",
    "sample_size",
    "addition_embed_type_num_heads",  # only used with addition_embed_type
    "addition_embed_type",
    "addition_time_embed_dim",
}


def _fail(message: str):
    raise ArchitectureError(f"unsupported diffusers UNet config: {message}")


def _check_fixed(config: Mapping[str, Any]) -> None:
    for name, value in config.items():
        if name.startswith("_") or name in _READ:
            continue
        if name in _FIXED:
            if value != _FIXED[name]:
                _fail(f"{name}={value!r} (only {_FIXED[name]!r} is supported)")
        elif value not in (None, False):  # an option newer than this table: only if unset
            _fail(f"unknown option {name}={value!r}")


def _levels(config: Mapping[str, Any], attention_down: str, attention_up: str, plain: tuple):
    """Per level: has attention; checks the up blocks mirror the down blocks."""
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    if set(down) - {attention_down, plain[0]} or len(up) != len(down):
        _fail(f"down_block_types {down}: allowed {attention_down}, {plain[0]}")
    attention = [t == attention_down for t in down]
    mirrored = [attention_up if a else plain[1] for a in reversed(attention)]
    if up != mirrored:
        _fail(f"up_block_types {up} do not mirror down_block_types {down} (expected {mirrored})")
    return attention


def _per_level(value: Any, levels: int, name: str) -> tuple:
    if isinstance(value, list | tuple):
        if len(value) != levels:
            _fail(f"{name} {value} needs one entry per level ({levels})")
        return tuple(value)
    return (value,) * levels


def _collapse(values: tuple):
    return values[0] if len(set(values)) == 1 else values


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DConditionModel / UNet2DModel config dict."""
    name = config.get("_class_name", "UNet2DConditionModel")
    if name not in ("UNet2DConditionModel", "UNet2DModel"):
        _fail(f"class {name!r}; supported: UNet2DConditionModel, UNet2DModel")
    _check_fixed(config)
    cross = name == "UNet2DConditionModel"
    channels = tuple(config["block_out_channels"])
    model_channels, levels = channels[0], len(channels)
    if any(c % model_channels for c in channels):
        _fail(f"block_out_channels {channels} must be multiples of the first")
    res_blocks = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        _fail(f"resnet_time_scale_shift={shift!r} (allowed 'default', 'scale_shift')")
    # diffusers gives every resnet, transformer/attention norm and conv_norm_out these groups
    # (None: per-block min(channels // 4, 32) and no conv_norm_out, which openaimodel lacks)
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        _fail("norm_num_groups=None (per-block group counts; need an integer)")
    common = dict(
        in_channels=config.get("in_channels", 4 if cross else 3),
        out_channels=config.get("out_channels", 4 if cross else 3),
        model_channels=model_channels,
        channel_mult=tuple(c // model_channels for c in channels),
        num_res_blocks=_collapse(res_blocks),
        dropout=config.get("dropout", 0.0),
        use_scale_shift_norm=shift == "scale_shift",
        upcast_attention=config.get("upcast_attention", False),
        norm_num_groups=groups,
    )
    if config.get("num_class_embeds") is not None:
        common["num_classes"] = config["num_class_embeds"]
    if cross:
        return UNetConfig(**common, **_cross_kwargs(config, channels))
    return UNetConfig(**common, **_plain_kwargs(config, channels, shift, groups))


def _attention_resolutions(attention: list[bool]) -> tuple[int, ...]:
    return tuple(2**level for level in reversed(range(len(attention))) if attention[level])


def _cross_kwargs(config: Mapping[str, Any], channels: tuple[int, ...]) -> dict[str, Any]:
    levels = len(channels)
    attention = _levels(config, _CROSS_DOWN, _CROSS_UP, ("DownBlock2D", "UpBlock2D"))
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        _fail(f"mid_block_type={config['mid_block_type']!r} (need UNetMidBlock2DCrossAttn)")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_level(heads, levels, "attention_head_dim")
    used = [lv for lv in range(levels) if attention[lv]] + [levels - 1]  # the middle: last
    if any(channels[lv] % heads[lv] for lv in used):
        _fail(f"attention heads {heads} do not divide block_out_channels {channels}")
    widths = {channels[lv] // heads[lv] for lv in used}
    if len({heads[lv] for lv in used}) == 1:
        head_kwargs = dict(num_heads=heads[levels - 1])
    elif len(widths) == 1:
        head_kwargs = dict(num_head_channels=widths.pop())
    else:
        _fail(f"attention heads {heads} are neither one count nor one width for every level")
    context = config.get("cross_attention_dim", 1280)
    if isinstance(context, list | tuple):
        if len(set(context)) != 1:
            _fail(f"cross_attention_dim {context} differs between blocks")
        context = context[0]
    only_cross = config.get("only_cross_attention", False)
    mid_only = config.get("mid_block_only_cross_attention")
    if only_cross is True and mid_only is not False:  # diffusers then makes the middle cross-only
        _fail("only_cross_attention=True also makes the middle block cross-attention-only")
    if mid_only:
        _fail("mid_block_only_cross_attention=True (openaimodel's middle block self-attends)")
    extra = _adm_kwargs(config)
    depth = _per_level(
        config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block"
    )
    return dict(
        attention_resolutions=_attention_resolutions(attention),
        legacy=False,
        use_spatial_transformer=True,
        transformer_depth=_collapse(depth),
        context_dim=context,
        use_linear_in_transformer=config.get("use_linear_projection", False),
        disable_self_attentions=(
            None if only_cross is False else _per_level(only_cross, levels, "only_cross")
        ),
        **head_kwargs,
        **extra,
    )


def _adm_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The adm MLP (label_emb): class_embedding "projection", or SDXL's text_time add_embedding."""
    class_type = config.get("class_embed_type")
    addition = config.get("addition_embed_type")
    dim = config.get("projection_class_embeddings_input_dim")
    time_dim = config.get("addition_time_embed_dim")
    if addition not in (None, "text_time"):
        _fail(f"addition_embed_type={addition!r} (allowed None, 'text_time')")
    if class_type not in (None, "projection"):
        _fail(f"class_embed_type={class_type!r} (allowed None, 'projection')")
    if (addition or class_type) and config.get("num_class_embeds") is not None:
        _fail("num_class_embeds together with a class or addition embedding (one label_emb)")
    if addition == "text_time":
        if class_type is not None:
            _fail("addition_embed_type='text_time' together with a class_embed_type")
        if dim is None or time_dim is None:
            _fail(
                "addition_embed_type='text_time' needs projection_class_embeddings_input_dim "
                f"and addition_time_embed_dim; got {dim!r}, {time_dim!r}"
            )
        return dict(num_classes="sequential", adm_in_channels=dim, addition_time_embed_dim=time_dim)
    if time_dim is not None:
        _fail(f"addition_time_embed_dim={time_dim!r} without addition_embed_type='text_time'")
    if class_type == "projection":
        return dict(num_classes="sequential", adm_in_channels=dim)
    return {}


def _plain_kwargs(config: Mapping[str, Any], channels: tuple[int, ...], shift: str, groups: int):
    updown = config.get("downsample_type", "conv")
    if updown not in ("conv", "resnet") or config.get("upsample_type", "conv") != updown:
        _fail("downsample_type and upsample_type must both be 'conv' or both 'resnet'")
    resnet = updown == "resnet"
    plain = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
        if resnet
        else ("DownBlock2D", "UpBlock2D")
    )
    attention = _levels(config, _ATTN_DOWN, _ATTN_UP, plain)
    if config.get("mid_block_type", "UNetMidBlock2D") != "UNetMidBlock2D":
        _fail(f"mid_block_type={config['mid_block_type']!r} (need UNetMidBlock2D)")
    # UNetMidBlock2D's attention norm: attn_norm_num_groups, or when None norm_num_groups under
    # "default" and no norm at all under "scale_shift"; ours always uses norm_num_groups
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups not in (None, groups) or (attn_groups is None and shift == "scale_shift"):
        _fail(
            f"attn_norm_num_groups={attn_groups!r} with norm_num_groups={groups!r} and "
            f"resnet_time_scale_shift={shift!r} (allowed: null under 'default', or equal to "
            "norm_num_groups)"
        )
    for name in ("class_embed_type", "addition_embed_type", "addition_time_embed_dim"):
        if config.get(name) is not None:
            _fail(f"{name}={config[name]!r} (UNet2DModel: only None)")
    head_dim = config.get("attention_head_dim", 8)
    heads = dict(num_heads=1) if head_dim is None else dict(num_head_channels=head_dim)
    return dict(
        attention_resolutions=_attention_resolutions(attention),
        resblock_updown=resnet,
        **heads,
    )
