"""Tiny members of each checkpoint family as CompVis files hold them (for the loading tests)."""

import dataclasses

import numpy as np

from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table, ema_key
from ldm_jax.models.conditioning import ClassEmbedderConfig
from ldm_jax.presets.tiny import TINY_CLIP_TEXT, TINY_UNET, TINY_VAE
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec
from support.tiny_specs import TINY_VQ, UNCONDITIONAL_VQ

# Tiny members of each family, obeying the family rules detection relies on (SD 1.x: 8 UNet
# heads; SD 2.x: 64-channel heads; text towers: 64-wide heads; first stages at resolution 256).
VAE = dataclasses.replace(TINY_VAE, resolution=256)
SD1 = ModelSpec(
    first_stage=VAE,
    unet=dataclasses.replace(TINY_UNET, attention_resolutions=(1,), num_heads=8),
    cond_stage=CondStageSpec("clip", TINY_CLIP_TEXT),
)
SD2 = ModelSpec(
    first_stage=VAE,
    unet=dataclasses.replace(
        TINY_UNET,
        model_channels=64,
        attention_resolutions=(2, 1),
        num_heads=-1,
        num_head_channels=64,
        use_linear_in_transformer=True,
    ),
    cond_stage=CondStageSpec(
        "openclip",
        dataclasses.replace(TINY_CLIP_TEXT, num_layers=3, activation="gelu", skip_last_layers=1),
    ),
)
CLASS_LDM = ModelSpec(
    first_stage=dataclasses.replace(TINY_VQ, resolution=256),
    unet=dataclasses.replace(
        UNCONDITIONAL_VQ.unet,
        attention_resolutions=(2, 1),
        num_heads=1,
        num_head_channels=-1,
        use_spatial_transformer=True,
        context_dim=16,
    ),
    cond_stage=CondStageSpec("class", ClassEmbedderConfig(11, 16, null_class=10), trainable=True),
    diffusion=DiffusionSpec(
        linear_start=0.0015, linear_end=0.0195, scale_factor=1.0, latent_size=8
    ),
)
BUFFERS = {
    "betas": np.linspace(1e-4, 2e-2, 1000, dtype=np.float32),
    "alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32),
    "model_ema.decay": np.array(0.9999, np.float32),
    "model_ema.num_updates": np.array(10, np.int32),
}


def compvis_state_dict(spec, params, *, ema=None, extra=()):
    state_dict = compvis_checkpoint_table(spec).to_torch(params) | BUFFERS | dict(extra)
    if ema is not None:
        unet = compvis_checkpoint_table(spec).to_torch(ema)
        state_dict |= {ema_key(k): v for k, v in unet.items() if k.startswith("model.diff")}
    return state_dict
