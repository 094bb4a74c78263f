"""Exact key tables between diffusers UNet state dicts and `ldm_jax.models.unet.UNet` params.

Cross-attention UNets (use_spatial_transformer) are diffusers `UNet2DConditionModel`s, the others
`UNet2DModel`s. `diffusers_unet_config` gives the diffusers class and constructor arguments that
compute the same function as a `UNetConfig` (the facts of diffusers'
pipelines/stable_diffusion/convert_from_ckpt.py `create_unet_diffusers_config`), or raises
ValueError for option sets diffusers cannot express.

Correspondence (openaimodel -> diffusers): input res block (level l, position j) ->
down_blocks.l.resnets.j / attentions.j; a level's Downsample -> down_blocks.l.downsamplers.0;
output block (level l, position j) -> up_blocks.(L-1-l).resnets.j / attentions.j, its Upsample ->
upsamplers.0; ResBlock in_layers/emb_layers/out_layers/skip -> norm1, conv1 / time_emb_proj /
norm2, conv2 / conv_shortcut.
"""

from typing import Any

from ldm_jax.checkpoints.key_table import (
    KeyMap,
    KeyTable,
    Transform,
    key_map,
    layer_maps,
    norm_maps,
)
from ldm_jax.models.unet import (
    AttentionSpec,
    BlockSpec,
    UNetConfig,
    UNetLayout,
    attention_heads,
    unet_layout,
)

_norm = norm_maps

_layer = layer_maps


def _resnet(t: str, f: str, *, skip: bool) -> list[KeyMap]:
    """diffusers ResnetBlock2D -> ResBlock."""
    entries = [
        *_norm(f"{t}.norm1", f"{f}/in_norm"),
        *_layer(f"{t}.conv1", f"{f}/in_conv", Transform.CONV),
        *_layer(f"{t}.time_emb_proj", f"{f}/emb_proj", Transform.LINEAR),
        *_norm(f"{t}.norm2", f"{f}/out_norm"),
        *_layer(f"{t}.conv2", f"{f}/out_conv", Transform.CONV),
    ]
    if skip:
        entries += _layer(f"{t}.conv_shortcut", f"{f}/skip", Transform.CONV)
    return entries


def _attention_projections(t: str, f: str, *, qkv_bias: bool) -> list[KeyMap]:
    """diffusers Attention to_q/to_k/to_v/to_out.0 -> MultiHeadAttention q/k/v/out."""
    entries = []
    for name in ("q", "k", "v"):
        entries += _layer(f"{t}.to_{name}", f"{f}/{name}", Transform.LINEAR, bias=qkv_bias)
    return entries + _layer(f"{t}.to_out.0", f"{f}/out", Transform.LINEAR)


def _transformer(t: str, f: str, spec: AttentionSpec, *, linear_proj: bool) -> list[KeyMap]:
    """diffusers Transformer2DModel -> SpatialTransformer."""
    proj = Transform.LINEAR if linear_proj else Transform.CONV1X1_AS_LINEAR
    entries = [
        *_norm(f"{t}.norm", f"{f}/norm"),
        *_layer(f"{t}.proj_in", f"{f}/proj_in", proj),
        *_layer(f"{t}.proj_out", f"{f}/proj_out", proj),
    ]
    for k in range(spec.depth):
        tb, fb = f"{t}.transformer_blocks.{k}", f"{f}/blocks_{k}"
        for n in (1, 2, 3):
            entries += _norm(f"{tb}.norm{n}", f"{fb}/norm{n}")
        for attn in ("attn1", "attn2"):
            entries += _attention_projections(f"{tb}.{attn}", f"{fb}/{attn}", qkv_bias=False)
        entries += _layer(f"{tb}.ff.net.0.proj", f"{fb}/ff/proj_in", Transform.LINEAR)
        entries += _layer(f"{tb}.ff.net.2", f"{fb}/ff/proj_out", Transform.LINEAR)
    return entries


def _attention(t: str, f: str, spec: AttentionSpec, config: UNetConfig) -> list[KeyMap]:
    if spec.depth:
        return _transformer(t, f, spec, linear_proj=config.use_linear_in_transformer)
    # diffusers Attention(_from_deprecated_attn_block=True) -> AttentionBlock
    return [
        *_norm(f"{t}.group_norm", f"{f}/norm"),
        *_attention_projections(t, f"{f}/attn", qkv_bias=True),
    ]


def _block(t: str, f: str, block: BlockSpec, config: UNetConfig) -> list[KeyMap]:
    """One res block (+ attention) of a diffusers down/up block."""
    skip = block.in_channels != block.out_channels
    entries = _resnet(f"{t}.resnets.{block.position}", f"{f}_res", skip=skip)
    if block.attention is not None:
        entries += _attention(
            f"{t}.attentions.{block.position}", f"{f}_attn", block.attention, config
        )
    return entries


def diffusers_unet_table(config: UNetConfig) -> KeyTable:
    """The key table for the diffusers model `diffusers_unet_config(config)` describes."""
    diffusers_unet_config(config)  # raises for option sets diffusers cannot express
    layout = unet_layout(config)
    levels = len(config.channel_mult)
    entries = [
        *_layer("conv_in", "conv_in", Transform.CONV),
        *_layer("time_embedding.linear_1", "time_embed_in", Transform.LINEAR),
        *_layer("time_embedding.linear_2", "time_embed_out", Transform.LINEAR),
    ]
    if isinstance(config.num_classes, int):
        entries.append(key_map("class_embedding.weight", "label_emb/embedding"))
    elif config.num_classes == "sequential":
        # SDXL's text_time MLP is diffusers' add_embedding (add_time_proj has no parameters)
        adm = "class_embedding" if config.addition_time_embed_dim is None else "add_embedding"
        entries += _layer(f"{adm}.linear_1", "label_emb_in", Transform.LINEAR)
        entries += _layer(f"{adm}.linear_2", "label_emb_out", Transform.LINEAR)

    for block in layout.input_blocks:
        t, f = f"down_blocks.{block.level}", f"input_blocks_{block.index}"
        if block.resample and config.resblock_updown:
            entries += _resnet(f"{t}.downsamplers.0", f"{f}_down", skip=False)
        elif block.resample:
            entries += _layer(f"{t}.downsamplers.0.conv", f"{f}_down/op", Transform.CONV)
        else:
            entries += _block(t, f, block, config)

    entries += _resnet("mid_block.resnets.0", "middle_res_0", skip=False)
    entries += _attention("mid_block.attentions.0", "middle_attn", layout.middle_attention, config)
    entries += _resnet("mid_block.resnets.1", "middle_res_1", skip=False)

    for block in layout.output_blocks:
        t, f = f"up_blocks.{levels - 1 - block.level}", f"output_blocks_{block.index}"
        entries += _block(t, f, block, config)
        if block.resample and config.resblock_updown:
            entries += _resnet(f"{t}.upsamplers.0", f"{f}_up", skip=False)
        elif block.resample:
            entries += _layer(f"{t}.upsamplers.0.conv", f"{f}_up/conv", Transform.CONV)

    entries += _norm("conv_norm_out", "out_norm")
    entries += _layer("conv_out", "out_conv", Transform.CONV)
    return KeyTable(entries)


def diffusers_unet_config(config: UNetConfig) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, constructor kwargs) of the model computing the same function."""
    if not config.conv_resample:
        raise ValueError("diffusers has no UNet with conv_resample=False (pooling resamplers)")
    layout = unet_layout(config)
    levels = range(len(config.channel_mult))
    has_attention = [
        any(b.attention and b.level == lv for b in layout.input_blocks) for lv in levels
    ]
    kwargs: dict[str, Any] = dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(m * config.model_channels for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        dropout=config.dropout,
        norm_num_groups=config.norm_num_groups,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default",
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    if isinstance(config.num_classes, int):
        kwargs["num_class_embeds"] = config.num_classes
    if config.use_spatial_transformer:
        return "UNet2DConditionModel", kwargs | _condition_kwargs(config, layout, has_attention)
    return "UNet2DModel", kwargs | _unconditional_kwargs(config, layout, has_attention)


def _attentions(layout: UNetLayout) -> list[tuple[int, AttentionSpec]]:
    blocks = layout.input_blocks + layout.output_blocks
    pairs = [(b.out_channels, b.attention) for b in blocks if b.attention is not None]
    return pairs + [(layout.middle_channels, layout.middle_attention)]


def _condition_kwargs(config: UNetConfig, layout: UNetLayout, has_attention: list[bool]) -> dict:
    if config.resblock_updown:
        raise ValueError(
            "diffusers' UNet2DConditionModel cannot express resblock_updown=True "
            "(its cross-attention blocks resample with convs)"
        )
    for channels, spec in _attentions(layout):
        if spec.num_heads * spec.head_dim != channels:
            raise ValueError(
                f"diffusers derives head width as channels // heads; {spec.num_heads} heads x "
                f"{spec.head_dim} != {channels} channels cannot be expressed"
            )
    # diffusers' `attention_head_dim` of UNet2DConditionModel is the number of heads per level.
    heads = [attention_heads(config, m * config.model_channels)[0] for m in config.channel_mult]
    depth = config.transformer_depth
    kwargs = dict(
        down_block_types=tuple(
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention
        ),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)
        ),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=heads[0] if len(set(heads)) == 1 else tuple(heads),
        cross_attention_dim=config.context_dim,
        transformer_layers_per_block=depth if isinstance(depth, int) else list(depth),
        use_linear_projection=config.use_linear_in_transformer,
        only_cross_attention=(
            tuple(config.disable_self_attentions) if config.disable_self_attentions else False
        ),
        upcast_attention=config.upcast_attention,
    )
    if config.num_classes == "sequential" and config.addition_time_embed_dim is not None:
        kwargs["addition_embed_type"] = "text_time"
        kwargs["addition_time_embed_dim"] = config.addition_time_embed_dim
        kwargs["projection_class_embeddings_input_dim"] = config.adm_in_channels
    elif config.num_classes == "sequential":
        kwargs["class_embed_type"] = "projection"
        kwargs["projection_class_embeddings_input_dim"] = config.adm_in_channels
    return kwargs


def _unconditional_kwargs(config: UNetConfig, layout: UNetLayout, has_attention: list[bool]):
    if not isinstance(config.num_res_blocks, int):
        raise ValueError("diffusers' UNet2DModel needs one num_res_blocks for every level")
    if config.num_classes == "sequential":
        raise ValueError("diffusers' UNet2DModel has no 'sequential' (projection) class embedding")
    head_dims = {spec.head_dim for _, spec in _attentions(layout)}
    if len(head_dims) != 1:
        raise ValueError(
            "diffusers' UNet2DModel uses one head width for every attention layer; this config "
            f"has {sorted(head_dims)} (set num_head_channels instead of num_heads)"
        )
    updown = config.resblock_updown
    plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    return dict(
        down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in has_attention),
        up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(has_attention)),
        mid_block_type="UNetMidBlock2D",
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        attention_head_dim=head_dims.pop(),
        # Without it diffusers drops the mid-block attention's GroupNorm under scale_shift.
        attn_norm_num_groups=config.norm_num_groups,
        add_attention=True,
    )
