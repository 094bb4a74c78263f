"""Every published LDM first stage, from CompVis/stable-diffusion (and CompVis/latent-diffusion)
`models/first_stage_models/<name>/config.yaml` (`vq-f8/model.yaml` for vq-f8).

All of them: in/out 3 channels, ch 128, 2 resnets per level, resolution 256, dropout 0.
"""

from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.vq import VQConfig


def _kl(z: int, ch_mult: tuple[int, ...], attn: tuple[int, ...]) -> AutoencoderConfig:
    return AutoencoderConfig(
        ch_mult=ch_mult, attn_resolutions=attn, z_channels=z, embed_dim=z, double_z=True
    )


def _vq(
    z: int, n_embed: int, ch_mult: tuple[int, ...], attn: tuple[int, ...], **kwargs
) -> VQConfig:
    return VQConfig(
        ch_mult=ch_mult, attn_resolutions=attn, z_channels=z, embed_dim=z, n_embed=n_embed, **kwargs
    )


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    "kl-f4": _kl(3, (1, 2, 4), ()),
    # Also the Stable Diffusion 1.x/2.x VAE.
    "kl-f8": _kl(4, (1, 2, 4, 4), ()),
    "kl-f16": _kl(16, (1, 1, 2, 2, 4), (16,)),
    "kl-f32": _kl(64, (1, 1, 2, 2, 4, 4), (16, 8)),
    "vq-f4": _vq(3, 8192, (1, 2, 4), ()),
    # attn_type "none": not even the mid-block attention.
    "vq-f4-noattn": _vq(3, 8192, (1, 2, 4), (), mid_attention=False),
    "vq-f8": _vq(4, 16384, (1, 2, 2, 4), (32,)),
    "vq-f8-n256": _vq(4, 256, (1, 2, 2, 4), (32,)),
    "vq-f16": _vq(8, 16384, (1, 1, 2, 2, 4), (16,)),
}

SD_VAE = AUTOENCODER_PRESETS["kl-f8"]
# SDXL's VAE is the same architecture (retrained weights); its latents are scaled differently
# (Stability-AI/generative-models sd_xl_base.yaml scale_factor, diffusers vae scaling_factor).
SDXL_VAE = SD_VAE
SDXL_SCALE_FACTOR = 0.13025
