"""Exact key table: CompVis openaimodel `UNetModel` state dict <-> our `UNet` params.

Keys are those under `model.diffusion_model.` of a CompVis / Stability-AI single-file checkpoint
(ldm/modules/diffusionmodules/openaimodel.py, ldm/modules/attention.py). Layout facts:
- `input_blocks.0.0` is conv_in; `input_blocks.N` / `output_blocks.N` are TimestepEmbedSequentials
  whose children are numbered: `.0` the ResBlock (or the Downsample's `.0.op` conv), `.1` the
  attention, and an output block's Upsample (`.conv`) or up-ResBlock last (`.1` or `.2`);
- ResBlock: in_layers = [GroupNorm, SiLU, conv] -> `in_layers.0/2`, emb_layers = [SiLU, Linear]
  -> `emb_layers.1`, out_layers = [GroupNorm, SiLU, Dropout, conv] -> `out_layers.0/3`, the 1x1
  `skip_connection` conv when the width changes;
- `middle_block.0/1/2` = ResBlock, attention, ResBlock; `time_embed.0/2`; `out.0/2`;
  `label_emb.weight` (nn.Embedding, int num_classes) or `label_emb.0.0/0.2` ("sequential");
- SpatialTransformer: `norm`, `proj_in`/`proj_out` (1x1 conv in SD 1.x, Linear with
  use_linear_in_transformer), `transformer_blocks.K.{attn1,attn2}.{to_q,to_k,to_v,to_out.0}`,
  `ff.net.0.proj`, `ff.net.2`, `norm1/2/3` (the same names as diffusers inside the block);
- plain AttentionBlock: `norm`, `qkv` (conv1d [3C, C, 1], heads interleaved as
  QKVAttentionLegacy reads them: [h0 q k v, h1 q k v, ...]), `proj_out` (conv1d).
"""

from ldm_jax.checkpoints.key_table import (
    Entry,
    KeyTable,
    Transform,
    fused_key_map,
    key_map,
    layer_maps,
    norm_maps,
)
from ldm_jax.models.unet import AttentionSpec, UNetConfig, unet_layout

_norm = norm_maps

_layer = layer_maps


def _resblock(t: str, f: str, *, skip: bool) -> list[Entry]:
    """openaimodel.ResBlock -> ResBlock."""
    entries = [
        *_norm(f"{t}.in_layers.0", f"{f}/in_norm"),
        *_layer(f"{t}.in_layers.2", f"{f}/in_conv", Transform.CONV),
        *_layer(f"{t}.emb_layers.1", f"{f}/emb_proj", Transform.LINEAR),
        *_norm(f"{t}.out_layers.0", f"{f}/out_norm"),
        *_layer(f"{t}.out_layers.3", f"{f}/out_conv", Transform.CONV),
    ]
    if skip:
        entries += _layer(f"{t}.skip_connection", f"{f}/skip", Transform.CONV)
    return entries


def _spatial_transformer(t: str, f: str, spec: AttentionSpec, *, linear: bool) -> list[Entry]:
    proj = Transform.LINEAR if linear else Transform.CONV1X1_AS_LINEAR
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
            for name in ("q", "k", "v"):  # CrossAttention: q/k/v without bias
                entries += _layer(
                    f"{tb}.{attn}.to_{name}", f"{fb}/{attn}/{name}", Transform.LINEAR, bias=False
                )
            entries += _layer(f"{tb}.{attn}.to_out.0", f"{fb}/{attn}/out", Transform.LINEAR)
        entries += _layer(f"{tb}.ff.net.0.proj", f"{fb}/ff/proj_in", Transform.LINEAR)
        entries += _layer(f"{tb}.ff.net.2", f"{fb}/ff/proj_out", Transform.LINEAR)
    return entries


def _attention_block(t: str, f: str, spec: AttentionSpec) -> list[Entry]:
    """openaimodel.AttentionBlock (QKVAttentionLegacy) -> AttentionBlock."""
    qkv = [f"{f}/attn/{name}" for name in ("q", "k", "v")]
    return [
        *_norm(f"{t}.norm", f"{f}/norm"),
        fused_key_map(
            f"{t}.qkv.weight",
            [f"{p}/kernel" for p in qkv],
            Transform.CONV1D_AS_LINEAR,
            num_heads=spec.num_heads,
        ),
        fused_key_map(f"{t}.qkv.bias", [f"{p}/bias" for p in qkv], num_heads=spec.num_heads),
        *_layer(f"{t}.proj_out", f"{f}/attn/out", Transform.CONV1D_AS_LINEAR),
    ]


def _attention(t: str, f: str, spec: AttentionSpec, config: UNetConfig) -> list[Entry]:
    if spec.depth:
        return _spatial_transformer(t, f, spec, linear=config.use_linear_in_transformer)
    return _attention_block(t, f, spec)


def compvis_unet_table(config: UNetConfig) -> KeyTable:
    """Every tensor of an openaimodel UNetModel with `config` (keys relative to
    `model.diffusion_model.`)."""
    layout = unet_layout(config)
    entries = [
        *_layer("input_blocks.0.0", "conv_in", Transform.CONV),
        *_layer("time_embed.0", "time_embed_in", Transform.LINEAR),
        *_layer("time_embed.2", "time_embed_out", Transform.LINEAR),
    ]
    if isinstance(config.num_classes, int):
        entries.append(key_map("label_emb.weight", "label_emb/embedding"))
    elif config.num_classes == "sequential":
        entries += _layer("label_emb.0.0", "label_emb_in", Transform.LINEAR)
        entries += _layer("label_emb.0.2", "label_emb_out", Transform.LINEAR)

    for block in layout.input_blocks:
        t, f = f"input_blocks.{block.index}", f"input_blocks_{block.index}"
        if block.resample and config.resblock_updown:
            entries += _resblock(f"{t}.0", f"{f}_down", skip=False)
        elif block.resample:
            if config.conv_resample:  # otherwise an average pool without parameters
                entries += _layer(f"{t}.0.op", f"{f}_down/op", Transform.CONV)
        else:
            skip = block.in_channels != block.out_channels
            entries += _resblock(f"{t}.0", f"{f}_res", skip=skip)
            if block.attention is not None:
                entries += _attention(f"{t}.1", f"{f}_attn", block.attention, config)

    entries += _resblock("middle_block.0", "middle_res_0", skip=False)
    entries += _attention("middle_block.1", "middle_attn", layout.middle_attention, config)
    entries += _resblock("middle_block.2", "middle_res_1", skip=False)

    for block in layout.output_blocks:
        t, f = f"output_blocks.{block.index}", f"output_blocks_{block.index}"
        skip = block.in_channels != block.out_channels
        entries += _resblock(f"{t}.0", f"{f}_res", skip=skip)
        child = 1
        if block.attention is not None:
            entries += _attention(f"{t}.1", f"{f}_attn", block.attention, config)
            child = 2
        if block.resample and config.resblock_updown:
            entries += _resblock(f"{t}.{child}", f"{f}_up", skip=False)
        elif block.resample and config.conv_resample:
            entries += _layer(f"{t}.{child}.conv", f"{f}_up/conv", Transform.CONV)

    entries += _norm("out.0", "out_norm")
    entries += _layer("out.2", "out_conv", Transform.CONV)
    return KeyTable(entries)
