"""Our CLIPTextConfig from a transformers CLIPTextConfig dict (a diffusers folder's text_encoder*/
config.json), for SD 1.x/2.x and both SDXL encoders: one reading of the fields and their checks."""

from collections.abc import Mapping
from typing import Any

from ldm_jax.checkpoints.errors import ArchitectureError
from ldm_jax.models.clip_text import CLIPTextConfig

TEXT_ACTIVATIONS = {"quick_gelu": "clip", "gelu": "openclip"}  # OpenAI CLIP vs OpenCLIP


def clip_text_config(config: Mapping[str, Any], architecture: str = "CLIPTextModel", *,
                     what: str = "text encoder", **fields) -> CLIPTextConfig:  # fmt: skip
    """The config of a transformers `architecture` model; `fields` set what the file does not
    say (how a pipeline reads the encoder: skipped layers, final norm, projection)."""
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures != [architecture]:
        raise ArchitectureError(f"{what} {architectures} is not supported; need {architecture}")
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in TEXT_ACTIVATIONS:
        raise ArchitectureError(
            f"{what} hidden_act {activation!r}: allowed {list(TEXT_ACTIVATIONS)}"
        )
    return CLIPTextConfig(
        vocab_size=config.get("vocab_size", 49408),
        max_length=config.get("max_position_embeddings", 77),
        width=config.get("hidden_size", 512),
        num_layers=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 8),
        mlp_dim=config.get("intermediate_size", 2048),
        activation=activation,
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        eos_token_id=config.get("eos_token_id", 2),
        **fields,
    )
