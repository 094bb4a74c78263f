"""Tiny ModelSpecs (SD1-like, SD2-like, unconditional VQ) shared by the checkpoint IO tests."""

import dataclasses

import jax
import numpy as np

from ldm_jax.models.factory import abstract_checkpoint_params
from ldm_jax.models.unet import UNetConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.presets.tiny import TINY_CLIP_TEXT, TINY_UNET, TINY_VAE
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec

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
