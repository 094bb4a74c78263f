"""ModelSpec from the original CompVis / Stability-AI yaml config of a checkpoint.

Reads `model.params` as CompVis ldm/models/diffusion/ddpm.py LatentDiffusion does (its defaults
included: DDPM's linear_start 1e-4 / linear_end 2e-2, scale_factor 1.0, conditioning_key from
concat_mode), `unet_config` as openaimodel UNetModel, `first_stage_config` as
ldm/models/autoencoder.py, and `cond_stage_config` as ldm/modules/encoders/modules.py. Options
that would change the computation and that the networks here do not implement are an error.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.checkpoints.compvis.checkpoint_table import SCALE_FACTOR_KEY
from ldm_jax.checkpoints.compvis.detect import (
    CLIP_KEYS,
    OPENCLIP_KEYS,
    CompVisArchitecture,
    clip_from_keys,
    openclip_from_keys,
)
from ldm_jax.checkpoints.errors import ArchitectureError
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.conditioning import ClassEmbedderConfig, SpatialRescalerConfig
from ldm_jax.models.ldm_bert import LDMBertConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.presets.text_encoders import CLIP_TEXT_PRESETS
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec

_LATENT_DIFFUSION = (
    "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",  # SD inpainting: same networks
)
_KL = ("ldm.models.autoencoder.AutoencoderKL",)
_VQ = ("ldm.models.autoencoder.VQModel", "ldm.models.autoencoder.VQModelInterface")
_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
_ENCODERS = "ldm.modules.encoders.modules."
# CompVis make_beta_schedule names -> ours: "linear" squares a linspace of square roots.
_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
_PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}
# norm_num_groups is no CompVis argument (CompVis always uses 32 groups): an unknown key there
_UNET_FIELDS = {f.name for f in dataclasses.fields(UNetConfig)} - {"norm_num_groups"}
# openaimodel arguments that change neither parameters nor results (memory/precision choices).
_UNET_NO_EFFECT = {"image_size", "use_checkpoint", "use_fp16", "use_bf16"}
# Arguments supported only at these values (openaimodel defaults or their equivalents).
_UNET_ONLY = {
    "dims": (2,),
    "use_new_attention_order": (False,),
    "n_embed": (None,),
    "num_attention_blocks": (None,),
    "disable_middle_self_attn": (False,),
    "spatial_transformer_attn_type": ("softmax", "softmax-xformers"),
}
_DDCONFIG_ONLY = {
    "give_pre_end": (False,),
    "tanh_out": (False,),
    "use_linear_attn": (False,),
    "resamp_with_conv": (True,),
    "attn_type": ("vanilla", "vanilla-xformers", "none"),
}


def read_yaml_config(config: Any) -> dict[str, Any]:
    """The parsed yaml (a path, or an already parsed mapping) with its `model:` section."""
    import yaml

    if isinstance(config, Mapping):
        data, name = dict(config), "the config mapping"
    else:
        name = str(config)
        try:
            with open(config, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as error:
            raise ArchitectureError(f"cannot read the yaml config {name}: {error}") from None
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
            raise ArchitectureError(f"{name} is not valid YAML: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ArchitectureError(f"{name} is not a CompVis model config (no 'model:' section)")
    return data


def spec_from_yaml(config: Any, state_dict: Mapping[str, Any] | None = None):
    """ModelSpec of a CompVis / Stability-AI yaml config (`configs/*.yaml`, `models/*/config.yaml`).

    Text encoders configured by name only (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder) take their
    sizes from the checkpoint's shapes when `state_dict` holds them, else from the presets.
    A section or value of an unexpected type is an ArchitectureError, like any unsupported one.
    """
    model = read_yaml_config(config)["model"]
    try:
        return _spec_from_model(model, state_dict)
    except ArchitectureError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError) as error:
        name = "the config mapping" if isinstance(config, Mapping) else str(config)
        what = f"lacks {error}" if isinstance(error, KeyError) else f"is unsupported ({error})"
        raise ArchitectureError(f"the yaml config {name} {what}") from None


def _spec_from_model(model: Mapping[str, Any], state_dict: Mapping[str, Any] | None):
    target, params = model.get("target"), model.get("params") or {}
    if target in _KL + _VQ:
        return CompVisArchitecture(ModelSpec(first_stage=_first_stage(model)), source="yaml")
    if target not in _LATENT_DIFFUSION:
        raise ArchitectureError(
            f"unsupported model target {target!r}; "
            f"supported: {', '.join(_LATENT_DIFFUSION + _KL + _VQ)}"
        )
    cond_config = params.get("cond_stage_config")
    first_stage = _first_stage(_section(params, "first_stage_config"))
    unet = _unet(_section(params, "unet_config"))
    diffusion = _diffusion(params, cond_config, state_dict or {})
    diffusion = dataclasses.replace(
        diffusion, concat_input=_concat_input(diffusion.conditioning_key, cond_config, unet,
                                              first_stage.embed_dim)
    )  # fmt: skip
    spec = ModelSpec(
        first_stage=first_stage,
        unet=unet,
        cond_stage=_cond_stage(cond_config, params, state_dict or {}),
        diffusion=diffusion,
    )
    return CompVisArchitecture(spec, cond_config == "__is_first_stage__", source="yaml")


def _concat_input(key, cond_config: Any, unet: UNetConfig, latent: int) -> str | None:
    """What the UNet's extra input channels hold (DiffusionSpec.concat_input), from the config."""
    extra = unet.in_channels - latent
    if key not in ("concat", "hybrid") or extra <= 0:
        return None
    if cond_config == "__is_first_stage__" and extra == latent + 1:  # LDM inpainting
        return "masked_image_and_mask"
    if key == "hybrid" and extra == latent + 1:  # SD inpainting (LatentInpaintDiffusion)
        return "mask_and_masked_image"
    target = cond_config.get("target") if isinstance(cond_config, Mapping) else None
    if target == "torch.nn.Identity" and extra == 3:  # LDM BSR super-resolution
        return "low_res_image"
    return None


def _section(params: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = params.get(name)
    if not isinstance(section, Mapping):
        raise ArchitectureError(f"the yaml config has no model.params.{name} section")
    return section


def _build(cls, where: str, **kwargs):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ArchitectureError(f"yaml {where}: {error}") from None


def _check_only(params: Mapping[str, Any], only: dict[str, tuple], where: str) -> None:
    for name, allowed in only.items():
        if name in params and params[name] not in allowed:
            raise ArchitectureError(
                f"yaml {where}.{name}={params[name]!r} is not supported; allowed: {allowed}"
            )


def _unet(section: Mapping[str, Any]) -> UNetConfig:
    if section.get("target") != _UNET_TARGET:
        raise ArchitectureError(
            f"unsupported unet_config target {section.get('target')!r}; supported: {_UNET_TARGET}"
        )
    params = dict(section.get("params") or {})
    _check_only(params, _UNET_ONLY, "unet_config.params")
    heads_up = params.pop("num_heads_upsample", -1)
    if heads_up not in (-1, params.get("num_heads", -1)):
        raise ArchitectureError(
            "yaml unet_config: num_heads_upsample != num_heads is not supported"
        )
    context = params.get("context_dim")
    if isinstance(context, list | tuple) and len(set(context)) == 1:
        params["context_dim"] = context[0]  # one context width given per depth
    kwargs = {k: v for k, v in params.items() if k in _UNET_FIELDS}
    unknown = set(params) - _UNET_FIELDS - _UNET_NO_EFFECT - set(_UNET_ONLY)
    if unknown:
        raise ArchitectureError(f"yaml unet_config.params has unsupported keys: {sorted(unknown)}")
    return _build(UNetConfig, "unet_config", **kwargs)


def _first_stage(section: Mapping[str, Any]) -> AutoencoderConfig:
    target, params = section.get("target"), section.get("params") or {}
    if target not in _KL + _VQ:
        raise ArchitectureError(
            f"unsupported first_stage_config target {target!r}; supported: {', '.join(_KL + _VQ)}"
        )
    dd = dict(params.get("ddconfig") or {})
    _check_only(dd, _DDCONFIG_ONLY, "ddconfig")
    try:
        common = dict(
            in_channels=dd["in_channels"],
            out_channels=dd["out_ch"],
            ch=dd["ch"],
            ch_mult=tuple(dd.get("ch_mult", (1, 2, 4, 8))),
            num_res_blocks=dd["num_res_blocks"],
            attn_resolutions=tuple(dd["attn_resolutions"]),
            resolution=dd["resolution"],
            z_channels=dd["z_channels"],
            embed_dim=params["embed_dim"],
            dropout=dd.get("dropout", 0.0),
            mid_attention=dd.get("attn_type", "vanilla") != "none",
        )
        if target in _VQ:
            if params.get("remap") is not None:
                raise ArchitectureError("yaml first_stage_config: codebook remap is not supported")
            return _build(
                VQConfig, "first_stage_config", n_embed=params["n_embed"], double_z=False, **common
            )
    except KeyError as error:
        raise ArchitectureError(f"yaml first_stage_config lacks {error.args[0]!r}") from None
    return _build(
        AutoencoderConfig, "first_stage_config", double_z=dd.get("double_z", True), **common
    )


def _cond_stage(config: Any, params: Mapping[str, Any], state_dict: Mapping[str, Any]):
    if config in (None, "__is_unconditional__", "__is_first_stage__"):
        return None
    if not isinstance(config, Mapping):
        raise ArchitectureError(f"unsupported cond_stage_config {config!r}")
    target, p = config.get("target"), config.get("params") or {}
    trainable = bool(params.get("cond_stage_trainable", False))
    name = target[len(_ENCODERS) :] if str(target).startswith(_ENCODERS) else target
    if name == "torch.nn.Identity":  # the conditioning image itself (super-resolution)
        return None
    if name == "FrozenCLIPEmbedder":
        _check_only(p, {"layer": ("last",)}, "cond_stage_config.params")
        if CLIP_KEYS + "embeddings.token_embedding.weight" in state_dict:
            return CondStageSpec("clip", clip_from_keys(state_dict), trainable)
        return CondStageSpec("clip", CLIP_TEXT_PRESETS["clip-vit-l-14"], trainable)
    if name == "FrozenOpenCLIPEmbedder":
        _check_only(p, {"layer": ("last", "penultimate"), "arch": ("ViT-H-14",)}, "cond_stage")
        skip = 1 if p.get("layer", "last") == "penultimate" else 0
        if OPENCLIP_KEYS + "token_embedding.weight" in state_dict:
            return CondStageSpec(
                "openclip", openclip_from_keys(state_dict, skip_last_layers=skip), trainable
            )
        preset = CLIP_TEXT_PRESETS["openclip-vit-h-14"]
        return CondStageSpec(
            "openclip", dataclasses.replace(preset, skip_last_layers=skip), trainable
        )
    if name == "BERTEmbedder":  # x-transformers Encoder defaults: 8 heads of 64, ff x4
        width = p.get("n_embed")
        bert = _build(
            LDMBertConfig,
            "cond_stage_config",
            vocab_size=p.get("vocab_size", 30522),
            max_length=p.get("max_seq_len", 77),
            width=width,
            num_layers=p.get("n_layer"),
            mlp_dim=4 * width if isinstance(width, int) else None,
        )
        return CondStageSpec("ldm_bert", bert, trainable)
    if name == "ClassEmbedder":
        n_classes = p.get("n_classes", 1000)
        # The extra last class is "no label" (Stability's ucg_rate; cin256-v2's class 1000).
        null = n_classes - 1 if "ucg_rate" in p or n_classes == 1001 else None
        cfg = _build(
            ClassEmbedderConfig,
            "cond_stage_config",
            n_classes=n_classes,
            embed_dim=p.get("embed_dim"),
            null_class=null,
        )
        return CondStageSpec("class", cfg, trainable)
    if name == "SpatialRescaler":
        cfg = _build(SpatialRescalerConfig, "cond_stage_config", **p)
        return CondStageSpec("spatial_rescaler", cfg, trainable)
    supported = (
        "FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, BERTEmbedder, ClassEmbedder, SpatialRescaler"
    )
    raise ArchitectureError(
        f"unsupported cond_stage_config target {target!r}; supported: {supported} (in "
        f"{_ENCODERS}), torch.nn.Identity, __is_unconditional__, __is_first_stage__"
    )


def _diffusion(params: Mapping[str, Any], cond_config: Any, state_dict: Mapping[str, Any]):
    parameterization = params.get("parameterization", "eps")
    schedule = params.get("beta_schedule", "linear")
    if parameterization not in _PARAMETERIZATIONS:
        raise ArchitectureError(
            f"unsupported parameterization {parameterization!r}; "
            f"allowed: {list(_PARAMETERIZATIONS)}"
        )
    if schedule not in _BETA_SCHEDULES:
        raise ArchitectureError(
            f"unsupported beta_schedule {schedule!r}; allowed: {list(_BETA_SCHEDULES)}"
        )
    key = params.get("conditioning_key")  # LatentDiffusion.__init__'s defaulting
    if key is None:
        key = "concat" if params.get("concat_mode", True) else "crossattn"
    if cond_config == "__is_unconditional__":
        key = None
    scale = params.get("scale_factor", 1.0)
    if params.get("scale_by_std", False):  # the data-derived scale is a buffer of the file
        if SCALE_FACTOR_KEY not in state_dict:
            raise ArchitectureError(
                f"the yaml sets scale_by_std but the checkpoint has no {SCALE_FACTOR_KEY!r} buffer"
            )
        scale = float(np.asarray(state_dict[SCALE_FACTOR_KEY]).reshape(()))
    return _build(
        DiffusionSpec,
        "model.params",
        num_timesteps=params.get("timesteps", 1000),
        beta_schedule=_BETA_SCHEDULES[schedule],
        linear_start=params.get("linear_start", 1e-4),
        linear_end=params.get("linear_end", 2e-2),
        prediction_type=_PARAMETERIZATIONS[parameterization],
        scale_factor=scale,
        conditioning_key=key,
        latent_size=params.get("image_size", 64),  # LatentDiffusion's image_size is latent
    )
