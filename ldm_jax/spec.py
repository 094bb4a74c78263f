"""The one model description: what a latent diffusion model is, independent of any file format.

`ModelSpec` is the architecture (the three networks' hyper-parameters) plus the diffusion settings
that are not network parameters (`DiffusionSpec`: noise schedule, parameterisation, latent
scaling, conditioning, and the diffusers timestep settings that pick the visited steps). The
networks are built from it by `ldm_jax.models.factory`; the checkpoint loaders produce it, the
exporters write it back, and the train step and the sampling pipeline read it. This module does no
IO and imports only the networks' config dataclasses.
"""

import dataclasses
import math
import types
import typing
from typing import Any

from ldm_jax.diffusion.timesteps import SPACINGS
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.conditioning import ClassEmbedderConfig, SpatialRescalerConfig
from ldm_jax.models.ldm_bert import LDMBertConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.models.vq import VQConfig

# CompVis cond_stage_config targets, by the name used here.
COND_STAGE_KINDS = (
    "clip",  # FrozenCLIPEmbedder: OpenAI CLIP ViT-L/14 text (SD 1.x)
    "openclip",  # FrozenOpenCLIPEmbedder: OpenCLIP ViT-H/14 text, penultimate layer (SD 2.x)
    "ldm_bert",  # BERTEmbedder: the jointly trained transformer of LDM text-to-image
    "class",  # ClassEmbedder (cin256)
    "spatial_rescaler",  # SpatialRescaler (semantic synthesis, super-resolution inputs)
    "sdxl",  # SGM GeneralConditioner of SDXL: CLIP text towers + micro-conditioning time ids
)
TEXT_CONDITIONINGS = ("clip", "openclip", "ldm_bert", "sdxl")  # the cond stages that take prompts
# ONE CLIP-architecture text tower (config: CLIPTextConfig); "sdxl" holds a tuple of them
CLIP_TEXT_CONDITIONINGS = ("clip", "openclip")
# LatentDiffusion.conditioning_key: how the conditioning reaches the UNet. "crossattn_adm": SGM's
# "crossattn" + "vector" outputs (SDXL): a cross-attention context and an adm vector y together.
CONDITIONING_KEYS = (None, "crossattn", "concat", "hybrid", "adm", "crossattn_adm")
# SDXL micro-conditioning ids, in the order SGM's embedders / diffusers' _get_add_time_ids use;
# each size/crop name stands for two ids (height, width) / (top, left)
SDXL_TIME_IDS = ("original_size", "crop_coords_top_left", "target_size", "aesthetic_score")
SDXL_BASE_TIME_IDS = ("original_size", "crop_coords_top_left", "target_size")
SDXL_REFINER_TIME_IDS = ("original_size", "crop_coords_top_left", "aesthetic_score")
# What a "concat"/"hybrid" model concatenates to its latents along channels, in this order:
CONCAT_INPUTS = (
    None,  # nothing (text-to-image, unconditional, class-conditional)
    "mask_and_masked_image",  # SD inpainting (9 ch): [x, mask, first_stage(masked image) * scale]
    "masked_image_and_mask",  # LDM inpainting (7 ch): [x, first_stage(masked image), mask in +-1]
    "low_res_image",  # LDM super-resolution (BSR, 6 ch): [x, low-res image in [-1, 1]]
)
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


@dataclasses.dataclass(frozen=True)
class SDXLConditionerConfig:
    """SDXL's conditioner: the context is the text encoders' outputs side by side (feature axis),
    y = [last encoder's projected pooled embedding, Fourier features (time_embed_dim each) of the
    time ids]. Base: (CLIP ViT-L, OpenCLIP bigG) + SDXL_BASE_TIME_IDS; refiner: (bigG,) +
    SDXL_REFINER_TIME_IDS."""

    text_encoders: tuple[CLIPTextConfig, ...]
    time_ids: tuple[str, ...] = SDXL_BASE_TIME_IDS
    time_embed_dim: int = 256
    # diffusers StableDiffusionXLPipeline: an empty negative prompt gives zero embeddings (context
    # and pooled) instead of the encoded "" (model_index.json force_zeros_for_empty_prompt)
    force_zeros_for_empty_prompt: bool = True

    def __post_init__(self):
        encoders = self.text_encoders
        if not isinstance(encoders, tuple) or not 1 <= len(encoders) <= 2:
            raise ValueError(f"text_encoders must be 1 or 2 CLIPTextConfigs; got {encoders!r:.80}")
        if not all(isinstance(e, CLIPTextConfig) for e in encoders):
            raise ValueError("text_encoders must be CLIPTextConfig objects")
        if encoders[-1].projection_dim is None:
            raise ValueError(
                "the last text encoder gives the pooled embedding of y: it needs projection_dim "
                "(CLIPTextModelWithProjection)"
            )
        if len({e.max_length for e in encoders}) != 1:
            raise ValueError(
                "the text encoders' contexts are concatenated per token: their max_length must "
                f"match; got {[e.max_length for e in encoders]}"
            )
        ids = self.time_ids
        if not isinstance(ids, tuple) or not ids or any(i not in SDXL_TIME_IDS for i in ids):
            raise ValueError(f"time_ids {ids!r}; allowed: a non-empty list of {SDXL_TIME_IDS}")
        if len(set(ids)) != len(ids) or list(ids) != sorted(ids, key=SDXL_TIME_IDS.index):
            raise ValueError(f"time_ids {ids!r} must be distinct and in the order {SDXL_TIME_IDS}")
        if type(self.time_embed_dim) is not int or self.time_embed_dim < 2:
            raise ValueError(f"time_embed_dim must be an int >= 2; got {self.time_embed_dim!r}")

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context (the UNet's context_dim)."""
        return sum(e.width for e in self.text_encoders)

    @property
    def num_time_ids(self) -> int:
        """How many scalars the time ids are (sizes and crops count two)."""
        return sum(1 if name == "aesthetic_score" else 2 for name in self.time_ids)

    @property
    def adm_dim(self) -> int:
        """Width of y (the UNet's adm_in_channels)."""
        return self.text_encoders[-1].projection_dim + self.num_time_ids * self.time_embed_dim


@dataclasses.dataclass(frozen=True)
class CondStageSpec:
    kind: str
    config: (
        CLIPTextConfig
        | LDMBertConfig
        | ClassEmbedderConfig
        | SpatialRescalerConfig
        | SDXLConditionerConfig
    )
    # CompVis cond_stage_trainable: trained jointly with the UNet (LDM BERT, class embedder) rather
    # than frozen (CLIP in Stable Diffusion). The weights are in the checkpoint either way.
    trainable: bool = False

    def __post_init__(self):
        if self.kind not in COND_STAGE_KINDS:
            raise ValueError(f"unknown cond stage {self.kind!r}; allowed: {COND_STAGE_KINDS}")
        if (self.kind == "sdxl") != isinstance(self.config, SDXLConditionerConfig):
            raise ValueError(
                f"cond stage {self.kind!r} with a {type(self.config).__name__}: the 'sdxl' kind "
                "and SDXLConditionerConfig go together"
            )

    @property
    def takes_text(self) -> bool:
        return self.kind in TEXT_CONDITIONINGS


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """The noise schedule and parameterisation (CompVis LatentDiffusion params)."""

    num_timesteps: int = 1000
    # CompVis "linear" = linspace of square roots, squared = diffusers "scaled_linear".
    beta_schedule: str = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    prediction_type: str = "epsilon"
    scale_factor: float = 0.18215  # latents are first_stage.encode(x) * scale_factor
    conditioning_key: str | None = "crossattn"
    # default latent height/width for sampling (diffusers unet.config.sample_size): 64 for SD 1.x
    # and SD 2 base (512 px), 96 for SD 2 768-v
    latent_size: int = 64
    concat_input: str | None = None  # one of CONCAT_INPUTS
    # diffusers scheduler settings that pick the visited timesteps (ldm_jax.diffusion.timesteps):
    # SD 1.x/2.x release configs use "leading", offset 1, final abar = abar_0 (set_alpha_to_one
    # False); loaders read them from a diffusers scheduler config, exports write them back.
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; allowed: {PREDICTION_TYPES}"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown beta_schedule {self.beta_schedule!r}; allowed: {BETA_SCHEDULES}"
            )
        if self.conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(
                f"unknown conditioning_key {self.conditioning_key!r}; allowed: {CONDITIONING_KEYS}"
            )
        if self.concat_input not in CONCAT_INPUTS:
            raise ValueError(
                f"unknown concat_input {self.concat_input!r}; allowed: {CONCAT_INPUTS}"
            )
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(
                f"unknown timestep_spacing {self.timestep_spacing!r}; allowed: {SPACINGS}"
            )
        offset = self.steps_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0 (not a bool), got {offset!r}")
        if not isinstance(self.set_alpha_to_one, bool):
            raise ValueError(
                f"set_alpha_to_one must be True or False, got {self.set_alpha_to_one!r}"
            )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Architecture of a checkpoint; `unet` is None for a first-stage-only checkpoint."""

    first_stage: AutoencoderConfig | VQConfig
    unet: UNetConfig | None = None
    cond_stage: CondStageSpec | None = None
    diffusion: DiffusionSpec = dataclasses.field(default_factory=DiffusionSpec)

    def __post_init__(self):
        sdxl_cond = self.cond_stage is not None and self.cond_stage.kind == "sdxl"
        sdxl_key = self.diffusion.conditioning_key == "crossattn_adm"
        if sdxl_cond != sdxl_key:
            raise ValueError(
                "an 'sdxl' cond stage and conditioning_key 'crossattn_adm' go together; got cond "
                f"stage {self.cond_stage and self.cond_stage.kind!r} with conditioning_key "
                f"{self.diffusion.conditioning_key!r}"
            )
        if sdxl_cond and self.unet is not None:
            cond, u = self.cond_stage.config, self.unet
            want = (cond.context_dim, "sequential", cond.adm_dim, cond.time_embed_dim)
            got = (u.context_dim, u.num_classes, u.adm_in_channels, u.addition_time_embed_dim)
            if got != want:
                raise ValueError(
                    "the SDXL conditioner gives (context width, y kind, y width, time embedding "
                    f"width) {want}; the UNet has (context_dim, num_classes, adm_in_channels, "
                    f"addition_time_embed_dim) {got}"
                )

    @property
    def first_stage_kind(self) -> str:
        return "vq" if isinstance(self.first_stage, VQConfig) else "kl"


# --- JSON (de)serialisation: orbax folders and exported files carry the spec they were made from.
_SPEC_TYPES = {
    cls.__name__: cls
    for cls in (
        AutoencoderConfig,
        VQConfig,
        UNetConfig,
        CLIPTextConfig,
        LDMBertConfig,
        ClassEmbedderConfig,
        SpatialRescalerConfig,
        SDXLConditionerConfig,
        CondStageSpec,
        DiffusionSpec,
        ModelSpec,
    )
}


def spec_to_dict(value: Any) -> Any:
    """A spec (or any of its configs) as JSON-ready data, each dataclass tagged with its type."""
    if dataclasses.is_dataclass(value):
        fields = {f.name: spec_to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"_type": type(value).__name__, **fields}
    if isinstance(value, tuple | list):
        return [spec_to_dict(v) for v in value]
    return value


def spec_from_dict(data: Any) -> Any:
    """Inverse of `spec_to_dict`; unknown types or fields, and values of the wrong type or out of
    range (e.g. `ch: "abc"`), raise ValueError naming them: the data may come from a file."""
    if isinstance(data, list):
        return tuple(spec_from_dict(v) for v in data)
    if not isinstance(data, dict):
        return data
    data = dict(data)
    type_name = data.pop("_type", None)
    if not isinstance(type_name, str) or type_name not in _SPEC_TYPES:
        raise ValueError(f"unknown spec type {type_name!r}; known: {sorted(_SPEC_TYPES)}")
    cls = _SPEC_TYPES[type_name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{type_name} has no fields {sorted(unknown)}; fields: {sorted(known)}")
    values = {k: spec_from_dict(v) for k, v in data.items()}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_value(f"{type_name}.{name}", value, hints[name])
    try:
        return cls(**values)
    except (TypeError, ValueError, ArithmeticError) as error:
        raise ValueError(f"{type_name}: {error}") from None


def validate_spec(spec: Any, where: str = "spec") -> None:
    """ValueError unless every field of `spec` (and of its configs) has its declared type and a
    sane range: specs built from yaml or diffusers configs are checked before shapes are built."""
    hints = typing.get_type_hints(type(spec))
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        _check_value(f"{where}.{f.name}", value, hints[f.name])
        if dataclasses.is_dataclass(value):
            validate_spec(value, f"{where}.{f.name}")
        elif isinstance(value, tuple):  # e.g. SDXLConditionerConfig.text_encoders
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate_spec(item, f"{where}.{f.name}[{i}]")


# Ints in a spec are sizes, counts and ids: -1 ("unset") up to this (vocabularies, codebooks).
MAX_SPEC_INT = 2**24
_MAX_TUPLE = 64


# Sizes that are at least 1 (a tuple of them: non-empty): a UNet of no levels is no network.
_POSITIVE_FIELDS = {
    "channel_mult",
    "ch_mult",
    "model_channels",
    "ch",
    "width",
    "mlp_dim",
    "in_channels",
    "out_channels",
    "vocab_size",
    "max_length",
    "num_timesteps",
    "norm_num_groups",  # GroupNorm groups (UNetConfig/AutoencoderConfig; absent in old specs: 32)
}


def _check_value(where: str, value: Any, hint: Any) -> None:
    if not _matches(value, hint):
        raise ValueError(f"{where}={_short(value)} is not allowed; allowed: {_describe(hint)}")
    if where.rsplit(".", 1)[-1] in _POSITIVE_FIELDS and value is not None:
        values = value if isinstance(value, tuple) else (value,)
        if not values or not all(v >= 1 for v in values):
            raise ValueError(f"{where}={_short(value)} is not allowed; allowed: sizes >= 1")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(hint)[0]
        ok = isinstance(value, tuple) and len(value) <= _MAX_TUPLE
        return ok and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return type(value) is int and -1 <= value <= MAX_SPEC_INT
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value) and abs(value) < 1e12
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list (at most {_MAX_TUPLE}) of {_describe(typing.get_args(hint)[0])}"
    if hint is int:
        return f"an integer in [-1, {MAX_SPEC_INT}]"
    if hint is float:
        return "a finite number"
    return getattr(hint, "__name__", str(hint))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
