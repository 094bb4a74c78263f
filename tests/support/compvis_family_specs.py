"""Tiny members of each checkpoint family as CompVis files hold them (for the loading tests)."""

import numpy as np

from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table, ema_key
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.conditioning import ClassEmbedderConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec

# Tiny members of each family, obeying the family rules detection relies on (SD 1.x: 8 UNet
# heads; SD 2.x: 64-channel heads; text towers: 64-wide heads; first stages at resolution 256).
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
SD1 = ModelSpec(
    first_stage=VAE,
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1,),
        num_heads=8,
        legacy=False,
        use_spatial_transformer=True,
        context_dim=64,
    ),
    cond_stage=CondStageSpec(
        "clip", CLIPTextConfig(width=64, num_layers=2, num_heads=1, mlp_dim=128)
    ),
)
SD2 = ModelSpec(
    first_stage=VAE,
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 1),
        num_head_channels=64,
        legacy=False,
        use_spatial_transformer=True,
        use_linear_in_transformer=True,
        context_dim=64,
    ),
    cond_stage=CondStageSpec(
        "openclip",
        CLIPTextConfig(
            width=64, num_layers=3, num_heads=1, mlp_dim=128, activation="gelu", skip_last_layers=1
        ),
    ),
)
CLASS_LDM = ModelSpec(
    first_stage=VQConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3, n_embed=16
    ),
    unet=UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 1),
        num_heads=1,
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
