"""Tiny ModelSpecs (SD1-like, SD2-like, unconditional VQ, SDXL) shared by the IO tests."""

import dataclasses

import jax
import numpy as np

from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.factory import abstract_checkpoint_params
from ldm_jax.models.unet import UNetConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.presets.tiny import TINY_CLIP_TEXT, TINY_UNET, TINY_VAE
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec, SDXLConditionerConfig

TINY_CLIP = TINY_CLIP_TEXT
# The UNet parity tests' base: a third level without attention and fewer output than input
# channels, so level and channel mix-ups in a key table show.
PARITY_UNET = dataclasses.replace(
    TINY_UNET,
    out_channels=3,
    channel_mult=(1, 2, 2),
    use_spatial_transformer=False,
    context_dim=None,
)
SD1_LIKE = ModelSpec(
    first_stage=TINY_VAE, unet=TINY_UNET, cond_stage=CondStageSpec("clip", TINY_CLIP)
)

TINY_VQ = VQConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, z_channels=3, embed_dim=3, n_embed=16
)
UNCONDITIONAL_VQ = ModelSpec(
    first_stage=TINY_VQ,
    unet=UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=16,
    ),
    diffusion=DiffusionSpec(
        linear_start=0.0015, linear_end=0.0195, scale_factor=1.0, conditioning_key=None
    ),
)


def random_params(spec: ModelSpec, seed: int = 0) -> dict:
    """Random values for every parameter (init would leave zeros and ones that hide errors)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
        abstract_checkpoint_params(spec),
    )


# SDXL at toy size, the same networks as tests/support/tiny_pipelines.sdxl_pipeline().
def _sdxl_text(width: int, layers: int, activation: str, projection=None) -> CLIPTextConfig:
    return CLIPTextConfig(
        width=width,
        num_layers=layers,
        num_heads=2,
        mlp_dim=64,
        activation=activation,
        skip_last_layers=1,
        final_norm_on_output=False,
        projection_dim=projection,
        eos_token_id=49407,  # transformers 5's CLIPTextConfig default (the hub's SDXL files: 2)
    )


TINY_SDXL_CONDITIONER = SDXLConditionerConfig(
    text_encoders=(_sdxl_text(32, 2, "quick_gelu"), _sdxl_text(48, 3, "gelu", 16)),
    time_embed_dim=8,
)
TINY_SDXL_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_heads=8,  # 8-channel heads at the one attention level, as the diffusers config reads
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=(1, 2),
    context_dim=TINY_SDXL_CONDITIONER.context_dim,
    num_classes="sequential",
    adm_in_channels=TINY_SDXL_CONDITIONER.adm_dim,
    addition_time_embed_dim=8,
    legacy=False,
    norm_num_groups=8,
)
TINY_SDXL = ModelSpec(
    first_stage=dataclasses.replace(TINY_VAE, resolution=16),  # the pipeline VAE's sample_size
    unet=TINY_SDXL_UNET,
    cond_stage=CondStageSpec("sdxl", TINY_SDXL_CONDITIONER),
    diffusion=DiffusionSpec(scale_factor=0.13025, conditioning_key="crossattn_adm", latent_size=8),
)


# The smallest SDXL that keeps every part (two encoders read at the penultimate layer, the
# pooled projection, text_time y, a transformer-free first level): the training tests compile it.
MICRO_SDXL_CONDITIONER = SDXLConditionerConfig(
    text_encoders=(
        dataclasses.replace(_sdxl_text(16, 2, "quick_gelu"), max_length=8, mlp_dim=32),
        dataclasses.replace(_sdxl_text(16, 2, "gelu", 8), max_length=8, mlp_dim=32),
    ),
    time_embed_dim=8,
)
MICRO_SDXL = dataclasses.replace(
    TINY_SDXL,
    unet=dataclasses.replace(
        TINY_SDXL_UNET, model_channels=16, num_heads=2, transformer_depth=(0, 1),
        context_dim=MICRO_SDXL_CONDITIONER.context_dim,
        adm_in_channels=MICRO_SDXL_CONDITIONER.adm_dim,
    ),
    cond_stage=CondStageSpec("sdxl", MICRO_SDXL_CONDITIONER),
)
