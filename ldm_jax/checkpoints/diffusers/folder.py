"""diffusers pipeline folders -> ModelSpec + parameters.

A folder (as `DiffusionPipeline.save_pretrained` writes it) has `model_index.json` and one folder
per component: `unet/`, `vae/` or `vqvae/`, `text_encoder/` (transformers CLIPTextModel) or `bert/`
(LDMBertModel), `tokenizer/`, `scheduler/`. Each network folder holds `config.json` and its
weights (`diffusion_pytorch_model.safetensors` or `model.safetensors`, possibly sharded with an
`.index.json`; `.bin` files are read with torch weights_only). Configs are translated exactly
(unknown or unsupported options are an error, never silently dropped).
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldm_jax.checkpoints.diffusers.autoencoder import (
    autoencoder_kl_table,
    config_from_diffusers,
    vq_model_table,
)
from ldm_jax.checkpoints.diffusers.ldm_bert import ldm_bert_key_table
from ldm_jax.checkpoints.diffusers.scheduler import (
    SCHEDULER_CONFIG,
    SCHEDULER_FOLDER,
    diffusion_from_scheduler,
)
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_table
from ldm_jax.checkpoints.diffusers.unet_config import unet_config_from_diffusers
from ldm_jax.checkpoints.errors import ArchitectureError, CheckpointFileError
from ldm_jax.checkpoints.files import MergedTensorFiles, open_tensor_file, read_params
from ldm_jax.checkpoints.transformers_clip import clip_text_key_table, detect_prefix
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.factory import abstract_checkpoint_params
from ldm_jax.models.ldm_bert import LDMBertConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.spec import CondStageSpec, ModelSpec

MODEL_INDEX = "model_index.json"
FIRST_STAGE_FOLDERS = ("vae", "vqvae")
TEXT_FOLDERS = ("text_encoder", "bert")
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# Pipelines that feed the first stage's latents to the UNet unscaled (LDM zoo ports).
UNSCALED_PIPELINES = ("LDMPipeline", "LDMSuperResolutionPipeline")
_TEXT_ACTIVATIONS = {"quick_gelu": "clip", "gelu": "openclip"}  # OpenAI CLIP vs OpenCLIP


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_INDEX).is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointFileError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFileError(f"{path} is not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointFileError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a component folder: safetensors first, then sharded, then .bin."""
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if (folder / name).is_file():
            return [folder / name]
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointFileError(f"{index} has no 'weight_map'")
            return [folder / shard for shard in sorted(set(weight_map.values()))]
    raise CheckpointFileError(
        f"{folder} holds no weights; expected one of {', '.join(WEIGHT_FILES)} "
        "(or a sharded '.index.json' of them)"
    )


def open_weights(folder: Path) -> MergedTensorFiles:
    return MergedTensorFiles([open_tensor_file(p) for p in weight_files(folder)])


def _component(folder: Path, index: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    """The first of `names` that model_index.json lists (with a class) and the folder holds."""
    for name in names:
        entry = index.get(name)
        if isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] is not None:
            if not (folder / name).is_dir():
                raise CheckpointFileError(
                    f"{MODEL_INDEX} lists {name!r} but {folder / name} is missing"
                )
            return name
    return None


def text_config_from_transformers(config: Mapping[str, Any]) -> tuple[str, CLIPTextConfig]:
    """(cond-stage kind, our config) from a transformers CLIPTextConfig dict."""
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"]:
        raise ArchitectureError(
            f"text encoder {architectures} is not supported; need CLIPTextModel"
        )
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in _TEXT_ACTIVATIONS:
        raise ArchitectureError(
            f"text encoder hidden_act {activation!r}: allowed {list(_TEXT_ACTIVATIONS)}"
        )
    cfg = CLIPTextConfig(
        vocab_size=config.get("vocab_size", 49408),
        max_length=config.get("max_position_embeddings", 77),
        width=config.get("hidden_size", 512),
        num_layers=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 8),
        mlp_dim=config.get("intermediate_size", 2048),
        activation=activation,
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        eos_token_id=config.get("eos_token_id", 2),
    )
    return _TEXT_ACTIVATIONS[activation], cfg


def ldm_bert_config_from_diffusers(config: Mapping[str, Any], logits_head: bool) -> LDMBertConfig:
    """Our config from a diffusers LDMBertConfig dict (pipelines/latent_diffusion)."""
    return LDMBertConfig(
        vocab_size=config.get("vocab_size", 30522),
        max_length=config.get("max_position_embeddings", 77),
        width=config.get("d_model", 1024),
        num_layers=config.get("encoder_layers", 32),
        num_heads=config.get("encoder_attention_heads", 16),
        head_dim=config.get("head_dim", 64),
        mlp_dim=config.get("encoder_ffn_dim", 4096),
        activation=config.get("activation_function", "gelu"),
        dropout=config.get("dropout", 0.1),
        logits_head=logits_head,
    )


def load_diffusers_folder(folder: str | Path, *, dtype=None) -> tuple[ModelSpec, dict, Path]:
    """(spec, params {"unet", "first_stage", "cond_stage"}, tokenizer folder or None)."""
    folder = Path(folder)
    index = read_json(folder / MODEL_INDEX)
    fs_name = _component(folder, index, FIRST_STAGE_FOLDERS)
    if fs_name is None or _component(folder, index, ("unet",)) is None:
        raise CheckpointFileError(
            f"{folder / MODEL_INDEX} must list a 'unet' and a 'vae' or 'vqvae' component"
        )
    fs_config = read_json(folder / fs_name / "config.json")
    first_stage = config_from_diffusers(fs_config)
    unet_json = read_json(folder / "unet" / "config.json")
    unet = unet_config_from_diffusers(unet_json)

    cond, text_name, text_weights = None, _component(folder, index, TEXT_FOLDERS), None
    if text_name is not None:
        text_weights = open_weights(folder / text_name)
        text_config = read_json(folder / text_name / "config.json")
        if text_name == "bert":
            logits = "to_logits.weight" in text_weights
            bert = ldm_bert_config_from_diffusers(text_config, logits)
            cond = CondStageSpec("ldm_bert", bert, trainable=True)  # trained with the UNet
        else:
            cond = CondStageSpec(*text_config_from_transformers(text_config))

    latent = first_stage.embed_dim
    concat = None
    if unet.context_dim is not None:
        key = "hybrid" if unet.in_channels == 2 * latent + 1 else "crossattn"
        concat = "mask_and_masked_image" if key == "hybrid" else None  # SD inpainting
    else:
        key = "concat" if unet.in_channels > latent else None
        if index.get("_class_name") == "LDMSuperResolutionPipeline":
            concat = "low_res_image"
    unscaled = index.get("_class_name") in UNSCALED_PIPELINES
    scale = 1.0 if unscaled else fs_config.get("scaling_factor", 0.18215)
    if not (folder / SCHEDULER_FOLDER).is_dir():
        raise CheckpointFileError(f"{folder} has no scheduler/ folder (the noise schedule)")
    scheduler_file = folder / SCHEDULER_FOLDER / SCHEDULER_CONFIG
    size = unet_json.get("sample_size") or 64
    try:  # the schedule and the timestep settings (spacing, offset, final alpha)
        diffusion = diffusion_from_scheduler(
            read_json(scheduler_file),
            scale_factor=scale,
            conditioning_key=key,
            concat_input=concat,
            latent_size=size[0] if isinstance(size, list | tuple) else size,
        )
    except ArchitectureError as error:
        raise ArchitectureError(f"{scheduler_file}: {error}") from None
    spec = ModelSpec(first_stage=first_stage, unet=unet, cond_stage=cond, diffusion=diffusion)

    abstract = abstract_checkpoint_params(spec)
    fs_table = vq_model_table if isinstance(first_stage, VQConfig) else autoencoder_kl_table
    params = {
        "unet": _read(folder / "unet", diffusers_unet_table(unet), abstract["unet"], dtype),
        "first_stage": _read(
            folder / fs_name, fs_table(first_stage), abstract["first_stage"], dtype
        ),
    }
    if cond is not None:
        if cond.kind == "ldm_bert":
            table = ldm_bert_key_table(cond.config)
        else:
            table = clip_text_key_table(cond.config, detect_prefix(text_weights))
        with text_weights:
            params["cond_stage"] = read_params(table, text_weights, abstract["cond_stage"], dtype)
    tokenizer = folder / "tokenizer"
    return spec, params, tokenizer if tokenizer.is_dir() else None


def _read(folder: Path, table, abstract, dtype) -> dict:
    with open_weights(folder) as state_dict:
        return read_params(table, state_dict, abstract, dtype, source=str(folder))
