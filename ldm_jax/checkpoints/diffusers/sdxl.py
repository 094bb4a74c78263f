"""diffusers SDXL pipeline folders: the two text encoders and the conditioner, both directions.

A base folder (`StableDiffusionXLPipeline`) holds `text_encoder/` (transformers CLIPTextModel,
CLIP ViT-L) and `text_encoder_2/` (CLIPTextModelWithProjection, OpenCLIP bigG) with
`tokenizer/` and `tokenizer_2/`; a refiner (`StableDiffusionXLImg2ImgPipeline`,
`requires_aesthetics_score: true`) only the second pair. Both encoders are read at
hidden_states[-2] without the final LayerNorm (what the pipeline does), so they load with
skip_last_layers=1 and final_norm_on_output=False and are written whole.
"""

from collections.abc import Mapping
from typing import Any

from ldm_jax.checkpoints.diffusers.text_config import clip_text_config
from ldm_jax.checkpoints.errors import ArchitectureError
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.spec import SDXL_BASE_TIME_IDS, SDXL_REFINER_TIME_IDS, SDXLConditionerConfig

SDXL_TEXT_FOLDERS = ("text_encoder", "text_encoder_2")
SDXL_PIPELINES = {
    SDXL_BASE_TIME_IDS: "StableDiffusionXLPipeline",
    SDXL_REFINER_TIME_IDS: "StableDiffusionXLImg2ImgPipeline",
}


def is_sdxl_index(index: Mapping[str, Any]) -> bool:
    """model_index.json of an SDXL pipeline: it lists a text_encoder_2 component."""
    entry = index.get("text_encoder_2")
    return isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] is not None


def sdxl_text_folders(num_encoders: int) -> tuple[str, ...]:
    return SDXL_TEXT_FOLDERS[-num_encoders:]


def sdxl_text_config(config: Mapping[str, Any], last: bool) -> CLIPTextConfig:
    """One SDXL encoder's config from its transformers config.json; the last encoder must be a
    CLIPTextModelWithProjection (its text_embeds are y's pooled part)."""
    return clip_text_config(
        config,
        "CLIPTextModelWithProjection" if last else "CLIPTextModel",
        what="SDXL text encoder",
        skip_last_layers=1,  # StableDiffusionXLPipeline reads hidden_states[-2] ...
        final_norm_on_output=False,  # ... as is
        projection_dim=config.get("projection_dim", 512) if last else None,
    )


def sdxl_conditioner(
    index: Mapping[str, Any], encoders: tuple[CLIPTextConfig, ...], time_embed_dim: int
) -> SDXLConditionerConfig:
    """The conditioner of a folder: refiner time ids when model_index.json says
    requires_aesthetics_score, else the base ones."""
    refiner = index.get("requires_aesthetics_score", False)
    zeros = index.get("force_zeros_for_empty_prompt", True)
    flags = (("requires_aesthetics_score", refiner), ("force_zeros_for_empty_prompt", zeros))
    for name, value in flags:
        if not isinstance(value, bool):
            raise ArchitectureError(f"model_index.json {name}={value!r}: allowed true or false")
    return SDXLConditionerConfig(
        text_encoders=encoders,
        time_ids=SDXL_REFINER_TIME_IDS if refiner else SDXL_BASE_TIME_IDS,
        time_embed_dim=time_embed_dim,
        force_zeros_for_empty_prompt=zeros,
    )


def sdxl_transformers_config(cfg: CLIPTextConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    """transformers config.json of one SDXL encoder (`base`: the plain CLIPTextModel fields)."""
    config = dict(base)
    if cfg.projection_dim is not None:
        config["architectures"] = ["CLIPTextModelWithProjection"]
        config["projection_dim"] = cfg.projection_dim
    return config


def sdxl_index_entries(cond: SDXLConditionerConfig) -> dict[str, Any]:
    """model_index.json entries of the text side (pipeline options included)."""
    n = len(cond.text_encoders)
    entries: dict[str, Any] = {}
    for folder, tokenizer, cfg in zip(
        SDXL_TEXT_FOLDERS, ("tokenizer", "tokenizer_2"), (None,) * (2 - n) + cond.text_encoders,
        strict=True,
    ):  # fmt: skip
        if cfg is None:
            entries |= {folder: [None, None], tokenizer: [None, None]}
            continue
        model = "CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"
        entries |= {folder: ["transformers", model], tokenizer: ["transformers", "CLIPTokenizer"]}
    entries["force_zeros_for_empty_prompt"] = cond.force_zeros_for_empty_prompt
    if cond.time_ids == SDXL_REFINER_TIME_IDS:
        entries["requires_aesthetics_score"] = True
    entries |= {"image_encoder": [None, None], "feature_extractor": [None, None]}
    return entries
