"""Exact key tables: CompVis `AutoencoderKL` / `VQModel` state dicts <-> ldm_jax parameters.

Keys are those under `first_stage_model.` of a latent-diffusion checkpoint, or at the top level
of a standalone first-stage `model.ckpt` (ldm/modules/diffusionmodules/model.py Encoder/Decoder,
ldm/models/autoencoder.py, taming's VectorQuantizer2). Layout facts:
- `encoder.down.{level}.block.{j}` / `.attn.{j}` / `.downsample.conv`; `decoder.up.{level}` is
  indexed by resolution level exactly as our `up_{level}` (CompVis builds the list in reverse and
  runs `up[num_levels - 1]` first), with `.upsample.conv`;
- `mid.block_1`, `mid.attn_1`, `mid.block_2`; `norm_out`, `conv_out`;
- ResnetBlock: `norm1`, `conv1`, `norm2`, `conv2`, and the 1x1 `nin_shortcut` when the width
  changes (the autoencoder has no timestep embedding, so no `temb_proj`);
- AttnBlock: `norm` and 1x1 convs `q`, `k`, `v`, `proj_out` (dense layers here);
- `quant_conv`, `post_quant_conv`, and the VQ codebook `quantize.embedding.weight`.
Training checkpoints also hold the loss (`loss.*`); compvis.py names those keys.
"""

from ldm_jax.checkpoints.key_table import (
    Entry,
    KeyTable,
    Transform,
    key_map,
    layer_maps,
    norm_maps,
)
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.vq import VQConfig


def _conv(t: str, f: str, transform: Transform = Transform.CONV) -> list[Entry]:
    return layer_maps(t, f, transform)


_norm = norm_maps


def _resnet(t: str, f: str, in_channels: int, out_channels: int) -> list[Entry]:
    entries = _norm(f"{t}.norm1", f"{f}/norm1") + _conv(f"{t}.conv1", f"{f}/conv1")
    entries += _norm(f"{t}.norm2", f"{f}/norm2") + _conv(f"{t}.conv2", f"{f}/conv2")
    if in_channels != out_channels:
        entries += _conv(f"{t}.nin_shortcut", f"{f}/nin_shortcut")
    return entries


def _attention(t: str, f: str) -> list[Entry]:
    entries = _norm(f"{t}.norm", f"{f}/norm")
    for torch_name, flax_name in (("q", "q"), ("k", "k"), ("v", "v"), ("proj_out", "out")):
        entries += _conv(f"{t}.{torch_name}", f"{f}/attn/{flax_name}", Transform.CONV1X1_AS_LINEAR)
    return entries


def _mid(t: str, f: str, cfg: AutoencoderConfig) -> list[Entry]:
    channels = cfg.ch * cfg.ch_mult[-1]
    entries = _resnet(f"{t}.block_1", f"{f}/block_1", channels, channels)
    if cfg.mid_attention:
        entries += _attention(f"{t}.attn_1", f"{f}/attn_1")
    return entries + _resnet(f"{t}.block_2", f"{f}/block_2", channels, channels)


def _encoder(cfg: AutoencoderConfig) -> list[Entry]:
    entries = _conv("encoder.conv_in", "encoder/conv_in")
    channels = cfg.ch
    for level, mult in enumerate(cfg.ch_mult):
        t, f = f"encoder.down.{level}", f"encoder/down_{level}"
        for j in range(cfg.num_res_blocks):
            entries += _resnet(f"{t}.block.{j}", f"{f}/block_{j}", channels, cfg.ch * mult)
            channels = cfg.ch * mult
            if cfg.attends_at(level):
                entries += _attention(f"{t}.attn.{j}", f"{f}/attn_{j}")
        if level != cfg.num_levels - 1:
            entries += _conv(f"{t}.downsample.conv", f"{f}/downsample/conv")
    entries += _mid("encoder.mid", "encoder/mid", cfg)
    entries += _norm("encoder.norm_out", "encoder/norm_out")
    return entries + _conv("encoder.conv_out", "encoder/conv_out")


def _decoder(cfg: AutoencoderConfig) -> list[Entry]:
    entries = _conv("decoder.conv_in", "decoder/conv_in")
    entries += _mid("decoder.mid", "decoder/mid", cfg)
    channels = cfg.ch * cfg.ch_mult[-1]
    for level in reversed(range(cfg.num_levels)):  # construction order; keys carry the level
        t, f = f"decoder.up.{level}", f"decoder/up_{level}"
        out_channels = cfg.ch * cfg.ch_mult[level]
        for j in range(cfg.num_res_blocks + 1):
            entries += _resnet(f"{t}.block.{j}", f"{f}/block_{j}", channels, out_channels)
            channels = out_channels
            if cfg.attends_at(level):
                entries += _attention(f"{t}.attn.{j}", f"{f}/attn_{j}")
        if level != 0:
            entries += _conv(f"{t}.upsample.conv", f"{f}/upsample/conv")
    entries += _norm("decoder.norm_out", "decoder/norm_out")
    return entries + _conv("decoder.conv_out", "decoder/conv_out")


def compvis_autoencoder_table(cfg: AutoencoderConfig) -> KeyTable:
    """CompVis AutoencoderKL <-> `AutoencoderKL(cfg)` params."""
    if isinstance(cfg, VQConfig):
        raise ValueError("a VQConfig describes a VQModel: use compvis_vq_table")
    return KeyTable(
        _encoder(cfg)
        + _conv("quant_conv", "quant_conv")
        + _conv("post_quant_conv", "post_quant_conv")
        + _decoder(cfg)
    )


def compvis_vq_table(cfg: VQConfig) -> KeyTable:
    """CompVis VQModel (VQModelInterface) <-> `VQModel(cfg)` params."""
    if not isinstance(cfg, VQConfig):
        raise ValueError(
            f"compvis_vq_table needs a VQConfig (with n_embed); got {type(cfg).__name__}"
        )
    return KeyTable(
        _encoder(cfg)
        + _conv("quant_conv", "quant_conv")
        + [key_map("quantize.embedding.weight", "quantize/codebook/embedding")]
        + _conv("post_quant_conv", "post_quant_conv")
        + _decoder(cfg)
    )


def compvis_first_stage_table(cfg: AutoencoderConfig | VQConfig) -> KeyTable:
    """The VQ table for a VQConfig, the KL table otherwise."""
    if isinstance(cfg, VQConfig):
        return compvis_vq_table(cfg)
    return compvis_autoencoder_table(cfg)
