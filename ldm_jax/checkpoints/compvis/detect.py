"""The architecture of a CompVis single-file checkpoint: from its keys and shapes, or its yaml.

Key detection covers what the weights settle: Stable Diffusion 1.x (CLIP text under
`cond_stage_model.transformer.text_model.`), 2.x (OpenCLIP under `cond_stage_model.model.`),
SDXL base and refiner (SGM `conditioner.embedders.<i>.`, 64-channel UNet heads),
their inpainting variants (9 UNet input channels) and standalone first stages (LDM zoo
`model.ckpt`). Widths, depths, levels, attention placement and codebooks come from tensor
shapes; what no shape shows comes from the family: SD 1.x UNets use 8 heads, SD 2.x 64-channel
heads, and both text towers 64-wide heads. Anything else (LDM zoo diffusion models, whose head
counts no tensor reveals) needs the original yaml config, which yaml_config.py reads.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.checkpoints.compvis.checkpoint_table import (
    COND_STAGE_PREFIX,
    FIRST_STAGE_PREFIX,
    SCALE_FACTOR_KEY,
    UNET_PREFIX,
)
from ldm_jax.checkpoints.compvis.text import SGM_EMBEDDERS_PREFIX
from ldm_jax.checkpoints.errors import ArchitectureError
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.text_time import SDXL_TIME_EMBED_DIM
from ldm_jax.models.unet import UNetConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.presets.sdxl import SDXL_DIFFUSION
from ldm_jax.spec import (
    SDXL_BASE_TIME_IDS,
    SDXL_REFINER_TIME_IDS,
    CondStageSpec,
    DiffusionSpec,
    ModelSpec,
    SDXLConditionerConfig,
)

CLIP_KEYS = COND_STAGE_PREFIX + "transformer.text_model."
OPENCLIP_KEYS = COND_STAGE_PREFIX + "model."
# SGM (SDXL) conditioners: base = CLIP ViT-L (HF layout) + OpenCLIP bigG; refiner = bigG only
SGM_CLIP_KEYS = SGM_EMBEDDERS_PREFIX + "0.transformer.text_model."
SGM_OPENCLIP_KEYS = (SGM_EMBEDDERS_PREFIX + "1.model.", SGM_EMBEDDERS_PREFIX + "0.model.")
SDXL_UNET_HEAD_CHANNELS = 64  # sd_xl_base.yaml / sd_xl_refiner.yaml num_head_channels
TEXT_HEAD_WIDTH = 64  # CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14 text towers
SD1_UNET_HEADS = 8  # v1-inference.yaml num_heads
SD2_UNET_HEAD_CHANNELS = 64  # v2-inference*.yaml num_head_channels
_FIRST_STAGE_RESOLUTION = 256  # only places attention (attn_resolutions are relative to it)
_PASS_YAML = "pass the model's original yaml config (config=...)"



@dataclasses.dataclass(frozen=True)
class CompVisArchitecture:
    spec: ModelSpec
    # `cond_stage_config: __is_first_stage__` (LDM inpainting): a second first-stage copy is saved.
    first_stage_as_cond_stage: bool = False
    source: str = "keys"  # "keys" or "yaml": how it was found, for error messages


def _has_shape(state_dict: Mapping[str, Any]) -> bool:
    return callable(getattr(state_dict, "shape", None))


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ArchitectureError(f"expected key {key!r} is missing; {_PASS_YAML} if this is a model")
    if _has_shape(state_dict):  # lazy files answer without reading the tensor
        return tuple(state_dict.shape(key))
    return tuple(state_dict[key].shape)


def _count(state_dict: Mapping[str, Any], pattern: str) -> int:
    """How many consecutive indices i (from 0) have pattern.format(i) as a key."""
    n = 0
    while pattern.format(n) in state_dict:
        n += 1
    return n


# ------------------------------------------------------------------ detection from keys


def detect_architecture(state_dict: Mapping[str, Any]) -> CompVisArchitecture:
    """Stable Diffusion 1.x / 2.x (incl. inpainting) or a standalone first stage, from keys."""
    keys = set(state_dict)
    if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
            return CompVisArchitecture(ModelSpec(first_stage=first_stage_from_keys(state_dict, "")))
        sample = ", ".join(sorted(keys)[:5])
        raise ArchitectureError(
            "not a CompVis latent-diffusion or first-stage checkpoint: no "
            f"'{UNET_PREFIX}*' or 'encoder.*'/'decoder.*' keys (first keys: {sample})"
        )
    first_stage = first_stage_from_keys(state_dict, FIRST_STAGE_PREFIX)
    if any(k.startswith(SGM_EMBEDDERS_PREFIX) for k in keys):
        return CompVisArchitecture(sdxl_from_keys(state_dict, first_stage))
    if CLIP_KEYS + "embeddings.token_embedding.weight" in keys:
        cond = CondStageSpec("clip", clip_from_keys(state_dict))
        unet = unet_from_keys(state_dict, num_heads=SD1_UNET_HEADS)
    elif OPENCLIP_KEYS + "token_embedding.weight" in keys:
        cond = CondStageSpec("openclip", openclip_from_keys(state_dict, skip_last_layers=1))
        unet = unet_from_keys(state_dict, num_head_channels=SD2_UNET_HEAD_CHANNELS)
    else:
        raise ArchitectureError(
            "the UNet's attention head count is not in the weights, and the conditioning "
            "encoder is neither SD 1.x CLIP nor SD 2.x OpenCLIP (no "
            f"'{CLIP_KEYS}*' or '{OPENCLIP_KEYS}*' keys); {_PASS_YAML}"
        )
    if unet.in_channels not in (4, 9):
        raise ArchitectureError(
            f"a Stable Diffusion UNet with {unet.in_channels} input channels (4: text-to-image, "
            f"9: inpainting) is of no family detected from keys; {_PASS_YAML}"
        )
    if unet.in_channels == 9:  # inpainting: [x, mask, masked-image latents]
        diffusion = DiffusionSpec(conditioning_key="hybrid", concat_input="mask_and_masked_image")
    else:
        diffusion = DiffusionSpec(conditioning_key="crossattn")
    if SCALE_FACTOR_KEY in state_dict:  # saved only by scale_by_std training: the true scale
        scale = float(np.asarray(state_dict[SCALE_FACTOR_KEY]).reshape(()))
        diffusion = dataclasses.replace(diffusion, scale_factor=scale)
    return CompVisArchitecture(ModelSpec(first_stage, unet, cond, diffusion))


def sdxl_from_keys(state_dict: Mapping[str, Any], first_stage) -> ModelSpec:
    """SDXL base (CLIP-L + bigG) or refiner (bigG) from an SGM file's shapes. The time ids follow
    from y's width: pooled + 6 (base) or 5 (refiner, with the aesthetic score) x 256."""
    keys = set(state_dict)
    base = SGM_CLIP_KEYS + "embeddings.token_embedding.weight" in keys
    bigg = SGM_OPENCLIP_KEYS[0 if base else 1]
    if bigg + "token_embedding.weight" not in keys or bigg + "text_projection" not in keys:
        raise ArchitectureError(
            f"an SGM conditioner ('{SGM_EMBEDDERS_PREFIX}*') that is neither SDXL base "
            f"('{SGM_CLIP_KEYS}*' + '{SGM_OPENCLIP_KEYS[0]}*') nor refiner "
            f"('{SGM_OPENCLIP_KEYS[1]}*') with its text_projection; {_PASS_YAML}"
        )
    options = dict(skip_last_layers=1, final_norm_on_output=False)
    last = openclip_from_keys(state_dict, prefix=bigg, **options)
    last = dataclasses.replace(last, projection_dim=_shape(state_dict, bigg + "text_projection")[1])
    encoders = (clip_from_keys(state_dict, SGM_CLIP_KEYS, **options), last) if base else (last,)
    unet = unet_from_keys(state_dict, num_head_channels=SDXL_UNET_HEAD_CHANNELS)
    if unet.num_classes != "sequential" or unet.in_channels != 4:
        raise ArchitectureError(
            "an SDXL conditioner with a UNet that takes no adm vector y (no label_emb.0.0) or "
            f"{unet.in_channels} input channels (4 expected); {_PASS_YAML}"
        )
    ids, rest = divmod(unet.adm_in_channels - last.projection_dim, SDXL_TIME_EMBED_DIM)
    time_ids = {6: SDXL_BASE_TIME_IDS, 5: SDXL_REFINER_TIME_IDS}.get(ids if not rest else None)
    if time_ids is None:
        raise ArchitectureError(
            f"the UNet's y is {unet.adm_in_channels} wide: the pooled {last.projection_dim} plus "
            f"6 (base) or 5 (refiner) time ids x {SDXL_TIME_EMBED_DIM} expected; {_PASS_YAML}"
        )
    unet = dataclasses.replace(unet, addition_time_embed_dim=SDXL_TIME_EMBED_DIM)
    cond = SDXLConditionerConfig(
        encoders, time_ids, force_zeros_for_empty_prompt=time_ids == SDXL_BASE_TIME_IDS
    )
    try:
        return ModelSpec(first_stage, unet, CondStageSpec("sdxl", cond), SDXL_DIFFUSION)
    except ValueError as error:
        raise ArchitectureError(f"unsupported SDXL architecture: {error}") from None


def unet_from_keys(
    state_dict: Mapping[str, Any], *, num_heads: int = -1, num_head_channels: int = -1
) -> UNetConfig:
    """A cross-attention openaimodel UNet's config from its shapes (heads given by the family)."""
    p = UNET_PREFIX
    model_channels, in_channels = _shape(state_dict, p + "input_blocks.0.0.weight")[:2]
    level, per_level = 0, [[]]  # per level: (out channels, attention) of each res block
    for i in range(1, 1000):
        t = f"{p}input_blocks.{i}"
        if f"{t}.0.op.weight" in state_dict:  # Downsample: the next level starts
            level += 1
            per_level.append([])
        elif f"{t}.0.in_layers.2.weight" in state_dict:
            out = _shape(state_dict, f"{t}.0.in_layers.2.weight")[0]
            per_level[level].append((out, _transformer_from_keys(state_dict, f"{t}.1", out)))
        else:
            break
    if not all(per_level) or any(c % model_channels for lv in per_level for c, _ in lv):
        raise ArchitectureError(f"unrecognised UNet block layout under '{p}'; {_PASS_YAML}")
    middle = _transformer_from_keys(state_dict, f"{p}middle_block.1", per_level[-1][-1][0])
    attention = [lv[0][1] for lv in per_level]
    found = [a for a in attention + [middle] if a is not None]
    if middle is None or len({a[1:] for a in found}) != 1:
        raise ArchitectureError(
            f"not a Stable-Diffusion-style cross-attention UNet (SpatialTransformers with one "
            f"projection type and context width in every attention); {_PASS_YAML}"
        )
    if attention[-1] is not None and attention[-1][0] != middle[0]:
        raise ArchitectureError(
            f"the deepest level and the middle block differ in depth; {_PASS_YAML}"
        )
    # a level without attention has no depth in the file: the others' common depth, else 1
    # (diffusers' convention: SDXL base (1, 2, 10), the refiner 4)
    known = {a[0] for a in found}
    fill = known.pop() if len(known) == 1 else 1
    depths = tuple(a[0] if a else fill for a in attention[:-1]) + (middle[0],)
    res_blocks = tuple(len(lv) for lv in per_level)
    kwargs = {}
    if UNET_PREFIX + "label_emb.weight" in state_dict:
        kwargs["num_classes"] = _shape(state_dict, UNET_PREFIX + "label_emb.weight")[0]
    elif UNET_PREFIX + "label_emb.0.0.weight" in state_dict:
        adm = _shape(state_dict, UNET_PREFIX + "label_emb.0.0.weight")[1]
        kwargs.update(num_classes="sequential", adm_in_channels=adm)
    return UNetConfig(
        in_channels=in_channels,
        out_channels=_shape(state_dict, p + "out.2.weight")[0],
        model_channels=model_channels,
        channel_mult=tuple(lv[0][0] // model_channels for lv in per_level),
        num_res_blocks=res_blocks[0] if len(set(res_blocks)) == 1 else res_blocks,
        attention_resolutions=tuple(2**lv for lv in reversed(range(level + 1)) if attention[lv]),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        legacy=False,
        use_spatial_transformer=True,
        transformer_depth=depths[0] if len(set(depths)) == 1 else depths,
        context_dim=middle[2],
        use_linear_in_transformer=middle[1],
        **kwargs,
    )


def _transformer_from_keys(state_dict, prefix: str, channels: int):
    """(depth, linear projections, context width) of a SpatialTransformer, or None if absent."""
    if f"{prefix}.proj_in.weight" not in state_dict:
        return None
    depth = _count(state_dict, prefix + ".transformer_blocks.{}.attn2.to_k.weight")
    linear = len(_shape(state_dict, f"{prefix}.proj_in.weight")) == 2
    context = _shape(state_dict, f"{prefix}.transformer_blocks.0.attn2.to_k.weight")[1]
    if _shape(state_dict, f"{prefix}.transformer_blocks.0.attn1.to_k.weight")[1] != channels:
        raise ArchitectureError(f"{prefix} has cross-attention-only blocks; {_PASS_YAML}")
    return depth, linear, context


def first_stage_from_keys(state_dict: Mapping[str, Any], prefix: str) -> AutoencoderConfig:
    """A CompVis AutoencoderKL / VQModel config from its shapes (keys under `prefix`)."""
    e, d = prefix + "encoder.", prefix + "decoder."
    ch, in_channels = _shape(state_dict, e + "conv_in.weight")[:2]
    levels = _count(state_dict, e + "down.{}.block.0.conv1.weight")
    num_res_blocks = _count(state_dict, e + "down.0.block.{}.conv1.weight")
    if not levels or not num_res_blocks:
        raise ArchitectureError(f"unrecognised first-stage layout under '{e}'")
    mults = [_shape(state_dict, f"{e}down.{lv}.block.0.conv2.weight")[0] for lv in range(levels)]
    attends = [f"{e}down.{lv}.attn.0.norm.weight" in state_dict for lv in range(levels)]
    z_channels = _shape(state_dict, d + "conv_in.weight")[1]
    double_z = _shape(state_dict, e + "conv_out.weight")[0] == 2 * z_channels
    common = dict(
        in_channels=in_channels,
        out_channels=_shape(state_dict, d + "conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(m // ch for m in mults),
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(
            _FIRST_STAGE_RESOLUTION // 2**lv for lv in range(levels) if attends[lv]
        ),
        resolution=_FIRST_STAGE_RESOLUTION,
        z_channels=z_channels,
        mid_attention=f"{e}mid.attn_1.norm.weight" in state_dict,
    )
    codebook = prefix + "quantize.embedding.weight"
    if codebook in state_dict:
        n_embed, embed_dim = _shape(state_dict, codebook)
        return VQConfig(embed_dim=embed_dim, n_embed=n_embed, double_z=double_z, **common)
    if not double_z:
        raise ArchitectureError(
            f"first stage under '{prefix}' has neither a codebook (VQ) nor a mean/log-variance "
            "encoder output (KL)"
        )
    embed_dim = _shape(state_dict, prefix + "quant_conv.weight")[0] // 2
    return AutoencoderConfig(embed_dim=embed_dim, double_z=True, **common)


def _text_config(vocab_width, length, layers, mlp, **kwargs) -> CLIPTextConfig:
    vocab, width = vocab_width
    if width % TEXT_HEAD_WIDTH:
        raise ArchitectureError(
            f"text encoder width {width} is not a multiple of the {TEXT_HEAD_WIDTH}-wide heads "
            f"of CLIP / OpenCLIP text towers; {_PASS_YAML}"
        )
    return CLIPTextConfig(
        vocab_size=vocab,
        max_length=length,
        width=width,
        num_layers=layers,
        num_heads=width // TEXT_HEAD_WIDTH,
        mlp_dim=mlp,
        **kwargs,
    )


def clip_from_keys(
    state_dict: Mapping[str, Any], prefix: str = CLIP_KEYS, **kwargs
) -> CLIPTextConfig:
    """SD 1.x FrozenCLIPEmbedder (an HF CLIPTextModel, quick-GELU) from its shapes."""
    layers = _count(state_dict, prefix + "encoder.layers.{}.mlp.fc1.weight")
    return _text_config(
        _shape(state_dict, prefix + "embeddings.token_embedding.weight"),
        _shape(state_dict, prefix + "embeddings.position_embedding.weight")[0],
        layers,
        _shape(state_dict, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        activation="quick_gelu",
        **kwargs,
    )


def openclip_from_keys(
    state_dict: Mapping[str, Any], *, skip_last_layers: int, prefix: str = OPENCLIP_KEYS, **kwargs
) -> CLIPTextConfig:
    """SD 2.x FrozenOpenCLIPEmbedder (open_clip text tower, GELU) from its shapes."""
    layers = _count(state_dict, prefix + "transformer.resblocks.{}.mlp.c_fc.weight")
    return _text_config(
        _shape(state_dict, prefix + "token_embedding.weight"),
        _shape(state_dict, prefix + "positional_embedding")[0],
        layers,
        _shape(state_dict, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        activation="gelu",
        skip_last_layers=skip_last_layers,
        **kwargs,
    )
