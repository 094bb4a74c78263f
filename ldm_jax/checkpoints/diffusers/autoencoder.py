"""Exact key tables: diffusers `AutoencoderKL` / `VQModel` state dicts <-> ldm_jax parameters.

Every key is enumerated from the hyper-parameters. Layout facts the table encodes:
- diffusers' decoder `up_blocks[i]` runs i-th, i.e. it is CompVis' `up[num_levels - 1 - i]`;
- diffusers names the mid-block `resnets.0 / attentions.0 / resnets.1` (CompVis block_1/attn_1/
  block_2) and the 1x1 shortcut conv `conv_shortcut` (CompVis nin_shortcut);
- the VAE attention is `group_norm` + Linear `to_q/to_k/to_v/to_out.0` (CompVis: 1x1 convs).
`config_from_diffusers` / `diffusers_config` translate the model configs both ways.
"""

from collections.abc import Mapping
from typing import Any

from ldm_jax.checkpoints.key_table import (
    KeyMap,
    KeyTable,
    Transform,
    key_map,
    layer_maps,
    norm_maps,
)
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.vq import VQConfig

_DOWN, _ATTN_DOWN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
_UP, _ATTN_UP = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


def _conv(t: str, f: str) -> list[KeyMap]:
    return layer_maps(t, f, Transform.CONV)


_norm = norm_maps


def _linear(t: str, f: str) -> list[KeyMap]:
    return layer_maps(t, f, Transform.LINEAR)


def _resnet(t: str, f: str, in_channels: int, out_channels: int) -> list[KeyMap]:
    entries = _norm(f"{t}.norm1", f"{f}/norm1") + _conv(f"{t}.conv1", f"{f}/conv1")
    entries += _norm(f"{t}.norm2", f"{f}/norm2") + _conv(f"{t}.conv2", f"{f}/conv2")
    if in_channels != out_channels:
        entries += _conv(f"{t}.conv_shortcut", f"{f}/nin_shortcut")
    return entries


def _attention(t: str, f: str) -> list[KeyMap]:
    entries = _norm(f"{t}.group_norm", f"{f}/norm")
    for torch_name, flax_name in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "out")):
        entries += _linear(f"{t}.{torch_name}", f"{f}/attn/{flax_name}")
    return entries


def _mid(t: str, f: str, cfg: AutoencoderConfig) -> list[KeyMap]:
    channels = cfg.ch * cfg.ch_mult[-1]
    entries = _resnet(f"{t}.resnets.0", f"{f}/block_1", channels, channels)
    if cfg.mid_attention:
        entries += _attention(f"{t}.attentions.0", f"{f}/attn_1")
    return entries + _resnet(f"{t}.resnets.1", f"{f}/block_2", channels, channels)


def _encoder(cfg: AutoencoderConfig) -> list[KeyMap]:
    entries = _conv("encoder.conv_in", "encoder/conv_in")
    channels = cfg.ch
    for level, mult in enumerate(cfg.ch_mult):
        t, f = f"encoder.down_blocks.{level}", f"encoder/down_{level}"
        for i in range(cfg.num_res_blocks):
            entries += _resnet(f"{t}.resnets.{i}", f"{f}/block_{i}", channels, cfg.ch * mult)
            channels = cfg.ch * mult
            if cfg.attends_at(level):
                entries += _attention(f"{t}.attentions.{i}", f"{f}/attn_{i}")
        if level != cfg.num_levels - 1:
            entries += _conv(f"{t}.downsamplers.0.conv", f"{f}/downsample/conv")
    entries += _mid("encoder.mid_block", "encoder/mid", cfg)
    entries += _norm("encoder.conv_norm_out", "encoder/norm_out")
    return entries + _conv("encoder.conv_out", "encoder/conv_out")


def _decoder(cfg: AutoencoderConfig) -> list[KeyMap]:
    entries = _conv("decoder.conv_in", "decoder/conv_in")
    entries += _mid("decoder.mid_block", "decoder/mid", cfg)
    channels = cfg.ch * cfg.ch_mult[-1]
    for i, level in enumerate(reversed(range(cfg.num_levels))):
        t, f = f"decoder.up_blocks.{i}", f"decoder/up_{level}"
        for j in range(cfg.num_res_blocks + 1):
            out_channels = cfg.ch * cfg.ch_mult[level]
            entries += _resnet(f"{t}.resnets.{j}", f"{f}/block_{j}", channels, out_channels)
            channels = out_channels
            if cfg.attends_at(level):
                entries += _attention(f"{t}.attentions.{j}", f"{f}/attn_{j}")
        if level != 0:
            entries += _conv(f"{t}.upsamplers.0.conv", f"{f}/upsample/conv")
    entries += _norm("decoder.conv_norm_out", "decoder/norm_out")
    return entries + _conv("decoder.conv_out", "decoder/conv_out")


def autoencoder_kl_table(cfg: AutoencoderConfig) -> KeyTable:
    """diffusers AutoencoderKL <-> `AutoencoderKL(cfg)` params."""
    _check_kl(cfg)
    return KeyTable(
        _encoder(cfg)
        + _conv("quant_conv", "quant_conv")
        + _conv("post_quant_conv", "post_quant_conv")
        + _decoder(cfg)
    )


def vq_model_table(cfg: VQConfig) -> KeyTable:
    """diffusers VQModel <-> `VQModel(cfg)` params."""
    return KeyTable(
        _encoder(cfg)
        + _conv("quant_conv", "quant_conv")
        + [key_map("quantize.embedding.weight", "quantize/codebook/embedding")]
        + _conv("post_quant_conv", "post_quant_conv")
        + _decoder(cfg)
    )


def _check_kl(cfg: AutoencoderConfig) -> None:
    if cfg.embed_dim != cfg.z_channels or not cfg.double_z:
        raise ValueError(
            "diffusers AutoencoderKL ties embed_dim to latent_channels and needs double_z=True; "
            f"got embed_dim={cfg.embed_dim}, z_channels={cfg.z_channels}, double_z={cfg.double_z}"
        )


def _require(config: Mapping[str, Any], name: str, allowed: Any, default: Any) -> None:
    value = config.get(name, default)
    if value != allowed:
        raise ValueError(
            f"unsupported diffusers autoencoder config: {name}={value!r}, need {allowed!r}"
        )


def config_from_diffusers(config: Mapping[str, Any]) -> AutoencoderConfig | VQConfig:
    """Our config from a diffusers AutoencoderKL or VQModel config dict (VQ iff it has a codebook).

    Attention levels come from the block types; `resolution` is `sample_size` (it only places them).
    """
    _require(config, "act_fn", "silu", "silu")
    _require(config, "norm_type", "group", "group")
    _require(config, "use_quant_conv", True, True)
    _require(config, "use_post_quant_conv", True, True)
    channels = tuple(config["block_out_channels"])
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {channels} must be multiples of the first entry")
    down = tuple(config["down_block_types"])
    attention = tuple(t == _ATTN_DOWN for t in down)
    expected_up = tuple(_ATTN_UP if a else _UP for a in reversed(attention))
    if set(down) - {_DOWN, _ATTN_DOWN} or tuple(config["up_block_types"]) != expected_up:
        raise ValueError(
            f"supported block types: down {_DOWN}/{_ATTN_DOWN} and the mirrored up types "
            f"{expected_up}; got down {down}, up {tuple(config['up_block_types'])}"
        )
    size = config.get("sample_size", 256)
    resolution = size[0] if isinstance(size, list | tuple) else size
    latent = config["latent_channels"]
    common = dict(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=config["layers_per_block"],
        attn_resolutions=tuple(resolution // 2**i for i, a in enumerate(attention) if a),
        resolution=resolution,
        z_channels=latent,
        mid_attention=config.get("mid_block_add_attention", True),
        # every GroupNorm of diffusers' Encoder/Decoder (resnets, attention, conv_norm_out)
        norm_num_groups=config.get("norm_num_groups", 32),
    )
    if "num_vq_embeddings" in config:
        embed_dim = config.get("vq_embed_dim") or latent
        return VQConfig(embed_dim=embed_dim, n_embed=config["num_vq_embeddings"], **common)
    return AutoencoderConfig(embed_dim=latent, double_z=True, **common)


def diffusers_config(cfg: AutoencoderConfig) -> dict[str, Any]:
    """Constructor arguments of the equivalent diffusers AutoencoderKL / VQModel."""
    attention = [cfg.attends_at(level) for level in range(cfg.num_levels)]
    config = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple(_ATTN_DOWN if a else _DOWN for a in attention),
        up_block_types=tuple(_ATTN_UP if a else _UP for a in reversed(attention)),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.resolution,
        mid_block_add_attention=cfg.mid_attention,
    )
    if isinstance(cfg, VQConfig):
        return config | dict(num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim)
    _check_kl(cfg)
    return config
