"""Tiny random-weight diffusers pipelines, as a user's diffusers folder would hold."""

import diffusers
import numpy as np
import torch
import transformers
from references.torch_reference import randomize_

from ldm_jax.tokenizers import CLIPTokenizer

TEXT_WIDTH = 64


def sd_components(unet_in_channels: int = 4) -> dict:
    unet = diffusers.UNet2DConditionModel(
        in_channels=unet_in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        sample_size=8,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=0.13025,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_WIDTH,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="quick_gelu",
        )
    )
    for seed, model in enumerate((unet, vae, text)):
        randomize_(model, seed)
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,  # as the SD release configs (the inpainting pipeline keeps it)
    )
    return dict(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=CLIPTokenizer.from_packaged_vocab().hf_tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_pipeline() -> diffusers.StableDiffusionPipeline:
    return diffusers.StableDiffusionPipeline(**sd_components())


def sd_inpaint_pipeline() -> diffusers.StableDiffusionInpaintPipeline:
    """SD inpainting: a 9-channel UNet ([latents, mask, masked-image latents])."""
    return diffusers.StableDiffusionInpaintPipeline(**sd_components(unet_in_channels=9))


def _vq_unet(in_channels: int, seed: int) -> tuple:
    unet = diffusers.UNet2DModel(
        in_channels=in_channels,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        sample_size=8,
    )
    vqvae = diffusers.VQModel(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=3,
        num_vq_embeddings=16,
        layers_per_block=1,
        scaling_factor=1.0,  # LDMPipeline divides by it; the LDM zoo latents are unscaled
    )
    randomize_(unet, seed)
    randomize_(vqvae, seed + 1)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    return vqvae.eval(), unet.eval(), scheduler


def ldm_pipeline() -> diffusers.LDMPipeline:
    """Unconditional LDM (CelebA/FFHQ/LSUN-style): VQ f2, 3 latent channels."""
    vqvae, unet, scheduler = _vq_unet(3, seed=0)
    return diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)


def ldm_super_resolution_pipeline() -> diffusers.LDMSuperResolutionPipeline:
    """LDM BSR-style super-resolution: the UNet takes [latents, low-res image] (6 channels)."""
    vqvae, unet, scheduler = _vq_unet(6, seed=3)
    return diffusers.LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)


def torch_noise(shape_NCHW, seed: int) -> tuple[torch.Generator, np.ndarray]:
    """(a generator, the NHWC numpy copy of what diffusers' randn_tensor draws first from it)."""
    noise = torch.randn(shape_NCHW, generator=torch.Generator().manual_seed(seed))
    return torch.Generator().manual_seed(seed), noise.numpy().transpose(0, 2, 3, 1).copy()


def reference_ddim(unet_fn, x_T_NHWC, scheduler, steps: int) -> np.ndarray:
    """diffusers DDIMScheduler stepping around `unet_fn(x_NHWC, t) -> output` (numpy): a sampler
    loop written independently of ldm_jax's samplers."""
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(np.ascontiguousarray(x_T_NHWC.transpose(0, 3, 1, 2)))
    for t in scheduler.timesteps:
        out = unet_fn(x.numpy().transpose(0, 2, 3, 1), int(t))
        out = torch.from_numpy(np.ascontiguousarray(np.asarray(out).transpose(0, 3, 1, 2)))
        x = scheduler.step(out, t, x).prev_sample
    return x.numpy().transpose(0, 2, 3, 1)
