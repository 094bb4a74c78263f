"""Exact key tables for the CompVis conditioning encoders (`cond_stage_model` of a checkpoint).

Each table's keys are relative to the prefix its docstring names; `compvis_cond_stage_table`
gives the one for a `CondStageSpec` relative to `cond_stage_model.`. Sources:
ldm/modules/encoders/modules.py (CompVis/latent-diffusion, CompVis/stable-diffusion,
Stability-AI/stablediffusion) and CompVis' ldm/modules/x_transformer.py.
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
from ldm_jax.checkpoints.transformers_clip import TEXT_MODEL_PREFIX, clip_text_key_table
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.conditioning import ClassEmbedderConfig, SpatialRescalerConfig
from ldm_jax.models.ldm_bert import LDMBertConfig
from ldm_jax.spec import CondStageSpec, SDXLConditionerConfig

# Where each encoder's keys start, relative to `cond_stage_model.`.
CLIP_PREFIX = "transformer."  # FrozenCLIPEmbedder.transformer: an HF CLIPTextModel
OPENCLIP_PREFIX = "model."  # FrozenOpenCLIPEmbedder.model: open_clip CLIP without .visual
# Tensors of the OpenCLIP model that Stable Diffusion never uses (the image-text contrastive
# head), and the causal-mask buffer older open_clip versions saved.
OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


_norm = norm_maps


def _linear(t: str, f: str, *, bias: bool = True) -> list[Entry]:
    return layer_maps(t, f, Transform.LINEAR, bias=bias)


def compvis_clip_table(cfg: CLIPTextConfig, text_model_prefix: str = TEXT_MODEL_PREFIX) -> KeyTable:
    """SD 1.x FrozenCLIPEmbedder, keys under `cond_stage_model.transformer.`: HF CLIPTextModel
    naming with `text_model.` (and the `position_ids` buffer older transformers saved).

    Some re-saved community files lack `text_model.`; pass `text_model_prefix=""` for those.
    """
    return clip_text_key_table(cfg, text_model_prefix)


def compvis_openclip_table(cfg: CLIPTextConfig) -> KeyTable:
    """SD 2.x FrozenOpenCLIPEmbedder, keys under `cond_stage_model.model.` (open_clip naming).

    `transformer.resblocks.N.attn` is a torch nn.MultiheadAttention: `in_proj_weight/bias` stack
    q, k, v along the first axis. Every block in the file is a parameter here (the 24-layer
    penultimate preset keeps all of them; skip_last_layers only skips computing the last).
    """
    entries = [
        key_map("token_embedding.weight", "token_embedding/embedding"),
        key_map("positional_embedding", "position_embedding/embedding"),
    ]
    for i in range(cfg.num_layers):
        t, f = f"transformer.resblocks.{i}", f"layers_{i}"
        qkv = [f"{f}/attn/{name}" for name in ("q", "k", "v")]
        entries += [
            *_norm(f"{t}.ln_1", f"{f}/norm1"),
            fused_key_map(
                f"{t}.attn.in_proj_weight", [f"{p}/kernel" for p in qkv], Transform.LINEAR
            ),
            fused_key_map(f"{t}.attn.in_proj_bias", [f"{p}/bias" for p in qkv]),
            *_linear(f"{t}.attn.out_proj", f"{f}/attn/out"),
            *_norm(f"{t}.ln_2", f"{f}/norm2"),
            *_linear(f"{t}.mlp.c_fc", f"{f}/fc1"),
            *_linear(f"{t}.mlp.c_proj", f"{f}/fc2"),
        ]
    entries += _norm("ln_final", "final_norm")
    return KeyTable(entries, ignorable=OPENCLIP_UNUSED)


# SGM (Stability-AI/generative-models) GeneralConditioner: SDXL's text encoders, each under
# `conditioner.embedders.<i>.`: FrozenCLIPEmbedder (HF CLIPTextModel under `transformer.`) and
# FrozenOpenCLIPEmbedder2 (open_clip under `model.`, whose `text_projection` SDXL uses).
SGM_EMBEDDERS_PREFIX = "conditioner.embedders."
SGM_OPENCLIP_UNUSED = ("logit_scale", "attn_mask")  # bigG's contrastive scale, causal-mask buffer


def sgm_openclip_table(cfg: CLIPTextConfig) -> KeyTable:
    """FrozenOpenCLIPEmbedder2, keys under `conditioner.embedders.<i>.model.`: the open_clip text
    tower of `compvis_openclip_table` plus `text_projection` [width, projection_dim], applied as
    x @ P (our kernel's layout; the transpose of transformers' `text_projection.weight`)."""
    entries = list(compvis_openclip_table(cfg).entries)
    if cfg.projection_dim is not None:
        entries.append(key_map("text_projection", "text_projection/kernel"))
    return KeyTable(entries, ignorable=SGM_OPENCLIP_UNUSED)


def sgm_embedder_prefixes(cfg: SDXLConditionerConfig) -> tuple[str, ...]:
    """Each encoder's key prefix: the last (with the projection) is OpenCLIP, earlier ones CLIP."""
    last = len(cfg.text_encoders) - 1
    return tuple(
        f"{SGM_EMBEDDERS_PREFIX}{i}.{OPENCLIP_PREFIX if i == last else CLIP_PREFIX}"
        for i in range(last + 1)
    )


def sgm_conditioner_table(cfg: SDXLConditionerConfig) -> KeyTable:
    """SDXL's conditioner in an SGM single file: keys from the file's root, Flax paths under
    `cond_stage/encoder_<i>` (the embedders of the time ids have no parameters)."""
    last = len(cfg.text_encoders) - 1
    tables = []
    prefixes = sgm_embedder_prefixes(cfg)
    for i, (prefix, text) in enumerate(zip(prefixes, cfg.text_encoders, strict=True)):
        table = sgm_openclip_table(text) if i == last else compvis_clip_table(text)
        tables.append(table.prefixed(prefix, f"cond_stage/encoder_{i}"))
    return KeyTable.union(*tables)


def compvis_ldm_bert_table(cfg: LDMBertConfig) -> KeyTable:
    """LDM text-to-image BERTEmbedder, keys under `cond_stage_model.`.

    x-transformers TransformerWrapper(Encoder): `transformer.token_emb`, `transformer.pos_emb.emb`,
    `transformer.attn_layers.layers.{2i}` = [LayerNorm, Attention, Residual] (to_q/to_k/to_v
    without bias, to_out), `.layers.{2i+1}` = [LayerNorm, FeedForward, Residual] with
    net = [Sequential(Linear, GELU), Dropout, Linear], then `transformer.norm` and the
    (conditioning-unused) `transformer.to_logits`.
    """
    t = "transformer."
    entries = [
        key_map(f"{t}token_emb.weight", "token_embedding/embedding"),
        key_map(f"{t}pos_emb.emb.weight", "position_embedding/embedding"),
    ]
    for i in range(cfg.num_layers):
        attn, ff = f"{t}attn_layers.layers.{2 * i}", f"{t}attn_layers.layers.{2 * i + 1}"
        f = f"layers_{i}"
        entries += _norm(f"{attn}.0", f"{f}/norm1")
        for name in ("q", "k", "v"):
            entries += _linear(f"{attn}.1.to_{name}", f"{f}/attn/{name}", bias=False)
        entries += _linear(f"{attn}.1.to_out", f"{f}/attn/out")
        entries += _norm(f"{ff}.0", f"{f}/norm2")
        entries += _linear(f"{ff}.1.net.0.0", f"{f}/fc1")
        entries += _linear(f"{ff}.1.net.2", f"{f}/fc2")
    entries += _norm(f"{t}norm", "final_norm")
    logits = _linear(f"{t}to_logits", "to_logits")
    if cfg.logits_head:
        return KeyTable(entries + logits)
    # A headless model loads full checkpoints by dropping the unused head.
    return KeyTable(entries, ignorable=[e.torch_key for e in logits])


def compvis_class_embedder_table(cfg: ClassEmbedderConfig) -> KeyTable:
    """ClassEmbedder, keys under `cond_stage_model.`: one nn.Embedding(n_classes, embed_dim)."""
    del cfg  # the shape is checked against the model's parameters when loading
    return KeyTable([key_map("embedding.weight", "embedding/embedding")])


def compvis_spatial_rescaler_table(cfg: SpatialRescalerConfig) -> KeyTable:
    """SpatialRescaler, keys under `cond_stage_model.`: the optional 1x1 `channel_mapper` conv
    (remap_output); without it the rescaler has no parameters (an empty table)."""
    if cfg.out_channels is None:
        return KeyTable([])
    entries = [key_map("channel_mapper.weight", "channel_mapper/kernel", Transform.CONV)]
    if cfg.bias:
        entries.append(key_map("channel_mapper.bias", "channel_mapper/bias"))
    return KeyTable(entries)


_CONFIG_TYPES = {
    "clip": CLIPTextConfig,
    "openclip": CLIPTextConfig,
    "ldm_bert": LDMBertConfig,
    "class": ClassEmbedderConfig,
    "spatial_rescaler": SpatialRescalerConfig,
}


def compvis_cond_stage_table(cond: CondStageSpec) -> KeyTable:
    """The table of `cond`'s encoder with keys relative to `cond_stage_model.`."""
    want = _CONFIG_TYPES.get(cond.kind)
    if want is not None and not isinstance(cond.config, want):
        raise ValueError(
            f"cond stage {cond.kind!r} needs a {want.__name__}; got {type(cond.config).__name__}"
        )
    if cond.kind == "clip":
        return compvis_clip_table(cond.config).prefixed(CLIP_PREFIX)
    if cond.kind == "openclip":
        return compvis_openclip_table(cond.config).prefixed(OPENCLIP_PREFIX)
    if cond.kind == "ldm_bert":
        return compvis_ldm_bert_table(cond.config)
    if cond.kind == "class":
        return compvis_class_embedder_table(cond.config)
    if cond.kind == "spatial_rescaler":
        return compvis_spatial_rescaler_table(cond.config)
    raise ValueError(f"no CompVis key table for cond stage {cond.kind!r}")
