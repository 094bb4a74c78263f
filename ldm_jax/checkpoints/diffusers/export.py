"""Export a CheckpointContents as a diffusers folder that PyTorch diffusers loads.

Stable Diffusion checkpoints (CLIP / OpenCLIP text, cross-attention) become a
`StableDiffusionPipeline` folder; unconditional LDMs an `LDMPipeline` folder (vqvae/unet/scheduler).
Weights go through the exact diffusers key tables; configs are the inverse of the loaders'.
diffusers ships SD 2's text encoder without its last block (the penultimate output is then the
last), so an OpenCLIP encoder that skips blocks is written truncated.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from ldm_jax.atomic import atomic_output, folder_kind
from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.diffusers.autoencoder import (
    autoencoder_kl_table,
    diffusers_config,
    vq_model_table,
)
from ldm_jax.checkpoints.diffusers.scheduler import (
    SCHEDULER_CONFIG,
    SCHEDULER_FOLDER,
    scheduler_config,
)
from ldm_jax.checkpoints.diffusers.sdxl import (
    SDXL_PIPELINES,
    sdxl_index_entries,
    sdxl_text_folders,
    sdxl_transformers_config,
)
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config, diffusers_unet_table
from ldm_jax.checkpoints.errors import UnsupportedExportError
from ldm_jax.checkpoints.transformers_clip import TEXT_MODEL_PREFIX, clip_text_key_table
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.spec import CLIP_TEXT_CONDITIONINGS, ModelSpec

# Written as the version of the format; diffusers only warns about a newer or older one.
DIFFUSERS_FORMAT_VERSION = "0.30.0"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# what overwrite may replace: another diffusers pipeline folder, never an unrelated folder
DIFFUSERS_FOLDER = folder_kind(
    "a diffusers checkpoint folder (with model_index.json)",
    lambda path: (path / "model_index.json").is_file(),
)


def save_diffusers(
    checkpoint: CheckpointContents,
    destination: str | os.PathLike,
    *,
    overwrite=False,
    protect=(),
) -> Path:
    """Write a diffusers pipeline folder at `destination` (atomically); `overwrite` replaces only
    a diffusers folder, never a `protect`ed path (see `ldm_jax.atomic`)."""
    spec, params = checkpoint.spec, checkpoint.params
    pipeline = _pipeline_class(spec)
    scheduler = scheduler_config(spec.diffusion, DIFFUSERS_FORMAT_VERSION)  # refuses before writing
    with atomic_output(
        destination, overwrite=overwrite, replaceable=DIFFUSERS_FOLDER, protect=protect
    ) as folder:
        folder.mkdir()
        unet_class, unet_kwargs = diffusers_unet_config(spec.unet)
        unet_kwargs["sample_size"] = spec.diffusion.latent_size
        _write_model(
            folder / "unet",
            unet_class,
            unet_kwargs,
            diffusers_unet_table(spec.unet).to_torch(params["unet"]),
        )
        vae_name = "vae" if pipeline in (*_SD_PIPELINES, *SDXL_PIPELINES.values()) else "vqvae"
        _write_first_stage(folder / vae_name, spec, params["first_stage"])
        components = {
            "unet": ["diffusers", unet_class],
            vae_name: [
                "diffusers",
                "VQModel" if spec.first_stage_kind == "vq" else "AutoencoderKL",
            ],
            "scheduler": ["diffusers", "DDIMScheduler"],
        }
        if pipeline in SDXL_PIPELINES.values():
            components |= _write_sdxl_text(folder, checkpoint)
        if pipeline in _SD_PIPELINES:
            _write_text_encoder(folder / "text_encoder", spec, params["cond_stage"])
            _tokenizer_for(checkpoint).write_folder(folder / "tokenizer")
            components |= {
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
            }
        _write_json(folder / SCHEDULER_FOLDER / SCHEDULER_CONFIG, scheduler)
        index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
        if pipeline in _SD_PIPELINES:
            index["requires_safety_checker"] = False
        _write_json(folder / "model_index.json", index | components)
    return Path(destination)


_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")


def _pipeline_class(spec: ModelSpec) -> str:
    cond = spec.cond_stage
    if spec.unet is None:
        raise UnsupportedExportError(
            "a first-stage-only checkpoint has no diffusers pipeline; export it to compvis or orbax"
        )
    if cond is not None and cond.kind == "sdxl":
        if cond.config.time_ids not in SDXL_PIPELINES or spec.diffusion.concat_input:
            raise UnsupportedExportError(
                f"diffusers has SDXL pipelines for the time ids {list(SDXL_PIPELINES)}; this "
                f"checkpoint has {cond.config.time_ids}: export it to compvis or orbax instead"
            )
        for cfg in cond.config.text_encoders:  # what StableDiffusionXLPipeline reads
            if (cfg.skip_last_layers, cfg.final_norm_on_output) != (1, False):
                raise UnsupportedExportError(
                    "diffusers' SDXL pipelines read each text encoder's hidden_states[-2] without "
                    "the final LayerNorm (skip_last_layers=1, final_norm_on_output=False); this "
                    f"checkpoint's encoder has {cfg.skip_last_layers}, "
                    f"{cfg.final_norm_on_output}: export it to orbax instead"
                )
        return SDXL_PIPELINES[cond.config.time_ids]
    if cond is not None and cond.kind in CLIP_TEXT_CONDITIONINGS:
        if spec.diffusion.conditioning_key not in ("crossattn", "hybrid"):
            raise UnsupportedExportError(
                f"text conditioning via {spec.diffusion.conditioning_key!r} "
                "has no diffusers pipeline"
            )
        if spec.diffusion.concat_input == "mask_and_masked_image":
            return "StableDiffusionInpaintPipeline"
        return "StableDiffusionPipeline"
    if cond is None and spec.diffusion.conditioning_key is None:
        return "LDMPipeline"
    if cond is None and spec.diffusion.concat_input == "low_res_image":
        return "LDMSuperResolutionPipeline"
    kind = cond.kind if cond else spec.diffusion.conditioning_key
    raise UnsupportedExportError(
        f"diffusers export supports Stable Diffusion (clip/openclip text) and unconditional LDMs; "
        f"this checkpoint is conditioned by {kind!r}: export it to compvis or orbax instead"
    )


def _first_stage_class(spec: ModelSpec) -> str:
    return "VQModel" if spec.first_stage_kind == "vq" else "AutoencoderKL"


def _write_first_stage(folder: Path, spec: ModelSpec, params: Any) -> None:
    cfg = spec.first_stage
    config = diffusers_config(cfg)
    if spec.first_stage_kind == "vq":
        _write_model(folder, "VQModel", config, vq_model_table(cfg).to_torch(params))
    else:
        config["scaling_factor"] = spec.diffusion.scale_factor
        _write_model(folder, "AutoencoderKL", config, autoencoder_kl_table(cfg).to_torch(params))


def _write_text_encoder(folder: Path, spec: ModelSpec, params: Any) -> None:
    cfg = spec.cond_stage.config
    if cfg.skip_last_layers:  # keep only the blocks that compute the output used
        kept = cfg.num_layers - cfg.skip_last_layers
        params = {
            k: v
            for k, v in params.items()
            if not (k.startswith("layers_") and int(k.split("_")[1]) >= kept)
        }
        cfg = dataclasses.replace(cfg, num_layers=kept, skip_last_layers=0)
    # with the "text_model." prefix: what hub folders carry, loadable by old and new transformers
    tensors = clip_text_key_table(cfg, TEXT_MODEL_PREFIX).to_torch(params)
    folder.mkdir(parents=True)
    _write_json(folder / "config.json", clip_transformers_config(cfg))
    _save_tensors(folder / "model.safetensors", tensors)


def _write_sdxl_text(folder: Path, checkpoint: CheckpointContents) -> dict[str, Any]:
    """Both SDXL encoders, whole (the pipeline reads hidden_states[-2] itself), with the
    `text_model.` prefix, their tokenizers; returns the model_index.json entries."""
    cond = checkpoint.spec.cond_stage.config
    names = sdxl_text_folders(len(cond.text_encoders))
    for i, (name, cfg) in enumerate(zip(names, cond.text_encoders, strict=True)):
        tensors = clip_text_key_table(cfg, TEXT_MODEL_PREFIX).to_torch(
            checkpoint.params["cond_stage"][f"encoder_{i}"]
        )
        (folder / name).mkdir(parents=True)
        config = sdxl_transformers_config(cfg, clip_transformers_config(cfg))
        _write_json(folder / name / "config.json", config)
        _save_tensors(folder / name / "model.safetensors", tensors)
    from ldm_jax.tokenizers.sdxl import SDXLTokenizers  # noqa: PLC0415

    tokenizer = checkpoint.tokenizer
    if not isinstance(tokenizer, SDXLTokenizers) or len(tokenizer) != len(names):
        tokenizer = SDXLTokenizers.from_packaged_vocab(len(names))
    tokenizer.write_folder(folder)  # tokenizer/ and tokenizer_2/
    return sdxl_index_entries(cond)


def clip_transformers_config(cfg: CLIPTextConfig) -> dict[str, Any]:
    """transformers CLIPTextConfig fields of the equivalent CLIPTextModel."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_length,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.width,
        "bos_token_id": 0,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


def _tokenizer_for(checkpoint: CheckpointContents):
    if checkpoint.tokenizer is not None and hasattr(checkpoint.tokenizer, "write_folder"):
        return checkpoint.tokenizer
    from ldm_jax.tokenizers.clip import CLIPTokenizer  # noqa: PLC0415

    return CLIPTokenizer.for_cond_stage(checkpoint.spec.cond_stage.kind)


def _write_model(folder: Path, class_name: str, kwargs: dict, tensors: dict) -> None:
    folder.mkdir(parents=True)
    config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    _write_json(folder / "config.json", config | _jsonable(kwargs))
    _save_tensors(folder / WEIGHTS, tensors)


def _save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    # "format": "pt" tells transformers/diffusers these are PyTorch-layout tensors
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
