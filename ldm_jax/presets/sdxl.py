"""Stable Diffusion XL as whole model descriptions (stabilityai/stable-diffusion-xl-base-1.0 and
-refiner-1.0): the UNet, text encoder and VAE presets with SDXL's conditioner and diffusion
settings (EulerDiscreteScheduler scheduler_config.json: scaled_linear 0.00085-0.012, "leading",
steps_offset 1; VAE scaling_factor 0.13025; 1024 px = 128x128 latents)."""

from ldm_jax.presets.autoencoders import SDXL_SCALE_FACTOR, SDXL_VAE
from ldm_jax.presets.text_encoders import clip_text_preset
from ldm_jax.presets.unets import UNET_PRESETS
from ldm_jax.spec import (
    SDXL_BASE_TIME_IDS,
    SDXL_REFINER_TIME_IDS,
    CondStageSpec,
    DiffusionSpec,
    ModelSpec,
    SDXLConditionerConfig,
)

SDXL_DIFFUSION = DiffusionSpec(
    scale_factor=SDXL_SCALE_FACTOR,
    conditioning_key="crossattn_adm",
    latent_size=128,
    timestep_spacing="leading",
    steps_offset=1,
    set_alpha_to_one=False,
)
_BIGG = clip_text_preset("openclip-vit-bigg-14")
SDXL_BASE_CONDITIONER = SDXLConditionerConfig(
    text_encoders=(clip_text_preset("clip-vit-l-14-sdxl"), _BIGG), time_ids=SDXL_BASE_TIME_IDS
)
SDXL_REFINER_CONDITIONER = SDXLConditionerConfig(
    text_encoders=(_BIGG,),
    time_ids=SDXL_REFINER_TIME_IDS,
    force_zeros_for_empty_prompt=False,  # the refiner's model_index.json
)
SDXL_PRESETS: dict[str, ModelSpec] = {
    "sdxl-base": ModelSpec(
        first_stage=SDXL_VAE,
        unet=UNET_PRESETS["sdxl-base"],
        cond_stage=CondStageSpec("sdxl", SDXL_BASE_CONDITIONER),
        diffusion=SDXL_DIFFUSION,
    ),
    "sdxl-refiner": ModelSpec(
        first_stage=SDXL_VAE,
        unet=UNET_PRESETS["sdxl-refiner"],
        cond_stage=CondStageSpec("sdxl", SDXL_REFINER_CONDITIONER),
        diffusion=SDXL_DIFFUSION,
    ),
}


def sdxl_preset(name: str) -> ModelSpec:
    if name not in SDXL_PRESETS:
        raise ValueError(f"unknown SDXL preset {name!r}; allowed: {sorted(SDXL_PRESETS)}")
    return SDXL_PRESETS[name]
