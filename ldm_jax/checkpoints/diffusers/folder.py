"""diffusers pipeline folders -> ModelSpec + parameters.

A folder (as `DiffusionPipeline.save_pretrained` writes it) has `model_index.json` and one folder
per component: `unet/`, `vae/` or `vqvae/`, `text_encoder/` (transformers CLIPTextModel) or `bert/`
(LDMBertModel), `tokenizer/`, `scheduler/`. Each network folder holds `config.json` and its
weights (`diffusion_pytorch_model.safetensors` or `model.safetensors`, possibly sharded with an
`.index.json`; `.bin` files are read with torch weights_only). Configs are translated exactly
(unknown or unsupported options are an error, never silently dropped).
"""

import contextlib
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
from ldm_jax.checkpoints.diffusers.sdxl import (
    SDXL_TEXT_FOLDERS,
    is_sdxl_index,
    sdxl_conditioner,
    sdxl_text_config,
)
from ldm_jax.checkpoints.diffusers.text_config import TEXT_ACTIVATIONS, clip_text_config
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_table
from ldm_jax.checkpoints.diffusers.unet_config import unet_config_from_diffusers
from ldm_jax.checkpoints.errors import (
    ArchitectureError,
    CheckpointFileError,
    CheckpointMismatchError,
)
from ldm_jax.checkpoints.files import MergedTensorFiles, open_tensor_file, read_params
from ldm_jax.checkpoints.transformers_clip import clip_text_key_table, detect_prefix
from ldm_jax.checkpoints.validate import (
    AUTOENCODER_FIELDS,
    CLIP_TEXT_FIELDS,
    LDM_BERT_FIELDS,
    UNET_FIELDS,
    check_against_tensors,
    check_fields,
)
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.factory import abstract_checkpoint_params
from ldm_jax.models.ldm_bert import LDMBertConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.spec import CondStageSpec, ModelSpec, validate_spec

MODEL_INDEX = "model_index.json"
FIRST_STAGE_FOLDERS = ("vae", "vqvae")
TEXT_FOLDERS = ("text_encoder", "bert", "text_encoder_2")
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# Pipelines that feed the first stage's latents to the UNet unscaled (LDM zoo ports).
UNSCALED_PIPELINES = ("LDMPipeline", "LDMSuperResolutionPipeline")


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
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointFileError(f"{index} has no 'weight_map'")
            return [_shard(index, shard) for shard in sorted(set(map(str, weight_map.values())))]
    raise CheckpointFileError(
        f"{folder} holds no weights; expected one of {', '.join(WEIGHT_FILES)} "
        "(or a sharded '.index.json' of them)"
    )


def _shard(index: Path, name: str) -> Path:
    """A shard file named by an index: a plain file name inside the index's folder (a hub repo
    must not point the loader at other files, through `..`, absolute paths or symlinks)."""
    folder = index.parent
    path = folder / name
    inside = folder.resolve()
    if name in ("", ".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        inside = None
    if inside is None or path.resolve().parent != inside:
        raise CheckpointFileError(
            f"{index}: shard {name!r} is not allowed; allowed: the name of a file in {folder}"
        )
    return path


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
    cfg = clip_text_config(config)
    return TEXT_ACTIVATIONS[cfg.activation], cfg


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


def _translate(path: Path, fields: Mapping[str, str], convert, *args):
    """`convert(config, *args)` of the JSON at `path`, its fields checked first; every failure
    is one ArchitectureError naming the file."""
    config = read_json(path)
    check_fields(config, fields, path)
    try:
        return config, convert(config, *args)
    except ArchitectureError as error:
        raise ArchitectureError(f"{path}: {error}") from None
    except (TypeError, ValueError, KeyError, IndexError, ArithmeticError) as error:
        what = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise ArchitectureError(f"{path}: unsupported config ({what})") from None


def load_diffusers_folder(folder: str | Path, *, dtype=None) -> tuple[ModelSpec, dict, Path]:
    """(spec, params {"unet", "first_stage", "cond_stage"}, tokenizer folder or None)."""
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        return _load(folder, dtype, stack)


def _load(folder: Path, dtype, stack: contextlib.ExitStack):
    index = read_json(folder / MODEL_INDEX)
    fs_name = _component(folder, index, FIRST_STAGE_FOLDERS)
    if fs_name is None or _component(folder, index, ("unet",)) is None:
        raise CheckpointFileError(
            f"{folder / MODEL_INDEX} must list a 'unet' and a 'vae' or 'vqvae' component"
        )
    fs_json = folder / fs_name / "config.json"
    fs_config, first_stage = _translate(fs_json, AUTOENCODER_FIELDS, config_from_diffusers)
    unet_path = folder / "unet" / "config.json"
    unet_json, unet = _translate(unet_path, UNET_FIELDS, unet_config_from_diffusers)
    weights = {"unet": stack.enter_context(open_weights(folder / "unet"))}
    weights["first_stage"] = stack.enter_context(open_weights(folder / fs_name))

    cond, text_name = None, _component(folder, index, TEXT_FOLDERS)
    sdxl = is_sdxl_index(index)
    if sdxl:  # SDXL: text_encoder (absent in a refiner) and text_encoder_2 -> one cond stage
        text_names = [n for n in SDXL_TEXT_FOLDERS if _component(folder, index, (n,))]
        text_weights = {
            n: stack.enter_context(open_weights(folder / n)) for n in text_names
        }  # fmt: skip
        encoders = tuple(
            _translate(
                folder / n / "config.json", CLIP_TEXT_FIELDS, sdxl_text_config, n == text_names[-1]
            )[1]
            for n in text_names
        )
        try:
            conditioner = sdxl_conditioner(index, encoders, unet.addition_time_embed_dim or 256)
            cond = CondStageSpec("sdxl", conditioner)
        except ValueError as error:
            raise ArchitectureError(f"{folder}: unsupported SDXL text encoders ({error})") from None
    elif text_name is not None:
        text_weights = weights["cond_stage"] = stack.enter_context(
            open_weights(folder / text_name)
        )
        text_json = folder / text_name / "config.json"
        if text_name == "bert":
            logits = "to_logits.weight" in text_weights
            _, bert = _translate(text_json, LDM_BERT_FIELDS, ldm_bert_config_from_diffusers, logits)
            cond = CondStageSpec("ldm_bert", bert, trainable=True)  # trained with the UNet
        else:
            _, (kind, text) = _translate(text_json, CLIP_TEXT_FIELDS, text_config_from_transformers)
            cond = CondStageSpec(kind, text)

    latent = first_stage.embed_dim
    concat = None
    if sdxl:
        key = "crossattn_adm"
    elif unet.context_dim is not None:
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
    try:
        spec = ModelSpec(first_stage=first_stage, unet=unet, cond_stage=cond, diffusion=diffusion)
        validate_spec(spec, "spec")
    except ValueError as error:
        raise ArchitectureError(f"{folder}: the configs give an unsupported {error}") from None
    checks = [(unet, "unet", "unet"), (first_stage, "first_stage", fs_name)]
    if sdxl:
        for name, config in zip(text_names, cond.config.text_encoders, strict=True):
            check_against_tensors(config, text_weights[name], folder / name / "config.json")
    elif cond is not None:
        checks.append((cond.config, "cond_stage", text_name))
    for config, name, subfolder in checks:  # before any shape is built from the configs
        check_against_tensors(config, weights[name], folder / subfolder / "config.json")

    try:  # configs whose fields pass but do not fit together are the folder's fault
        abstract = abstract_checkpoint_params(spec)
        fs_table = vq_model_table if isinstance(first_stage, VQConfig) else autoencoder_kl_table
        tables = {"unet": diffusers_unet_table(unet), "first_stage": fs_table(first_stage)}
        if sdxl:
            text_tables = [
                clip_text_key_table(config, detect_prefix(text_weights[name]))
                for name, config in zip(text_names, cond.config.text_encoders, strict=True)
            ]
        elif cond is not None and cond.kind == "ldm_bert":
            tables["cond_stage"] = ldm_bert_key_table(cond.config)
        elif cond is not None:
            tables["cond_stage"] = clip_text_key_table(cond.config, detect_prefix(text_weights))
    except (TypeError, ValueError, IndexError, KeyError, ArithmeticError) as error:
        if isinstance(error, ArchitectureError | CheckpointFileError | CheckpointMismatchError):
            raise
        raise ArchitectureError(f"{folder}: unsupported architecture ({error})") from None
    sources = {"unet": "unet", "first_stage": fs_name, "cond_stage": text_name}
    params = {
        name: read_params(
            table, weights[name], abstract[name], dtype, source=str(folder / sources[name])
        )
        for name, table in tables.items()
    }
    if sdxl:  # the tokenizers are the folder's tokenizer/ and tokenizer_2/
        params["cond_stage"] = {
            f"encoder_{i}": read_params(
                table, text_weights[name], abstract["cond_stage"][f"encoder_{i}"], dtype,
                source=str(folder / name),
            )  # fmt: skip
            for i, (name, table) in enumerate(zip(text_names, text_tables, strict=True))
        }
        return spec, params, folder
    tokenizer = folder / "tokenizer"
    return spec, params, tokenizer if tokenizer.is_dir() else None
