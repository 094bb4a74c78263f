"""A tiny SD-1-shaped text-to-image model: the same blocks as Stable Diffusion at toy widths.

For smoke runs of the benchmarks (`--tiny` / `--model tiny`) and for tests that need the SD 1.x
architecture (cross-attention UNet, KL autoencoder, CLIP text tower) in seconds on a CPU.
"""

from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.unet import UNetConfig

TINY_IMAGE_SIZE = 32  # pixels; the autoencoder (factor 2) gives 16x16x4 latents
TINY_VAE = AutoencoderConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=TINY_IMAGE_SIZE, z_channels=4, embed_dim=4
)
# 64-wide heads as in every CLIP text tower, so the architecture is detectable from the keys
TINY_CLIP_TEXT = CLIPTextConfig(
    vocab_size=49408, max_length=77, width=64, num_layers=2, num_heads=1, mlp_dim=128
)
TINY_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    num_heads=2,
    use_spatial_transformer=True,
    context_dim=TINY_CLIP_TEXT.width,
    legacy=False,
)
