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


# --- SDXL: two text encoders (CLIP-L-like, bigG-like with projection) and a text_time UNet.
SDXL_TEXT_WIDTHS = (32, 48)  # encoder 1, encoder 2: the context is 80 wide
SDXL_PROJECTION = 16  # encoder 2's text_embeds (the pooled part of y)
SDXL_TIME_DIM = 8  # addition_time_embed_dim
# SGM-detectable sizes: text towers of 64-wide heads (CLIP, OpenCLIP), y's 256-wide features
SGM_TEXT_WIDTHS, SGM_PROJECTION = (64, 128), 32


def sdxl_text_encoders(widths=SDXL_TEXT_WIDTHS, heads=(2, 2), projection=SDXL_PROJECTION):
    """(CLIPTextModel quick_gelu, CLIPTextModelWithProjection gelu), random weights."""
    common = dict(vocab_size=49408, intermediate_size=64)
    one = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=widths[0],
            num_attention_heads=heads[0],
            num_hidden_layers=2,
            hidden_act="quick_gelu",
            **common,
        )
    )
    two = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(
            hidden_size=widths[1],
            num_attention_heads=heads[1],
            num_hidden_layers=3,
            hidden_act="gelu",
            projection_dim=projection,
            **common,
        )
    )
    randomize_(one, 10)
    randomize_(two, 11)
    return one.eval(), two.eval()


def sdxl_unet(
    *, time_ids: int = 6, context: int = sum(SDXL_TEXT_WIDTHS), seed: int = 12, sgm: bool = False
):
    """A tiny text_time UNet (sd_xl_base-like: no attention at level 0, depth 2 at level 1).
    `sgm`: what SGM files fix and their keys cannot show (64-channel heads, 32 GroupNorm
    groups, 256-wide time-id features) at the smallest widths that allow it."""
    widths, heads = ((64, 128), (1, 2)) if sgm else ((32, 64), (4, 8))  # 64- / 8-channel heads
    time_dim, projection = (256, SGM_PROJECTION) if sgm else (SDXL_TIME_DIM, SDXL_PROJECTION)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=widths,
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=heads,
        cross_attention_dim=context,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=projection + time_ids * time_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32 if sgm else 8,
        sample_size=8,
    )
    randomize_(unet, seed)
    return unet.eval()


def sdxl_tokenizer_2():
    """transformers CLIPTokenizer padding with "!" (id 0), as SDXL's tokenizer_2 folder says."""
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as folder:
        CLIPTokenizer.for_cond_stage("openclip").write_folder(folder)
        return transformers.CLIPTokenizer.from_pretrained(folder)


def sdxl_pipeline() -> diffusers.StableDiffusionXLPipeline:
    """A tiny SDXL base pipeline (EulerDiscreteScheduler as in the release scheduler_config)."""
    text_1, text_2 = sdxl_text_encoders()
    vae = sd_components()["vae"]  # scaling_factor 0.13025 as SDXL's
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_1,
        text_encoder_2=text_2,
        tokenizer=CLIPTokenizer.from_packaged_vocab().hf_tokenizer,
        tokenizer_2=sdxl_tokenizer_2(),
        unet=sdxl_unet(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def sdxl_refiner_pipeline() -> diffusers.StableDiffusionXLImg2ImgPipeline:
    """A tiny SDXL refiner: text_encoder_2 only, aesthetic-score time ids (5)."""
    _, text_2 = sdxl_text_encoders()
    base = sdxl_pipeline()
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=text_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=sdxl_unet(time_ids=5, context=SDXL_TEXT_WIDTHS[1], seed=13),
        scheduler=base.scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def sgm_sdxl_pipeline(refiner: bool = False):
    """A tiny SDXL base (or refiner) whose every hyper-parameter an SGM single file's keys and
    shapes settle (see `sdxl_unet(sgm=True)`), for the single-file tests."""
    text_1, text_2 = sdxl_text_encoders(SGM_TEXT_WIDTHS, (1, 2), SGM_PROJECTION)
    base = sdxl_pipeline()
    context = SGM_TEXT_WIDTHS[1] if refiner else sum(SGM_TEXT_WIDTHS)
    unet = sdxl_unet(time_ids=5 if refiner else 6, context=context, seed=14, sgm=True)
    common = dict(
        vae=base.vae, text_encoder_2=text_2, tokenizer_2=base.tokenizer_2, unet=unet,
        scheduler=base.scheduler,
    )  # fmt: skip
    if refiner:
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, **common,
        )  # fmt: skip
    return diffusers.StableDiffusionXLPipeline(
        text_encoder=text_1, tokenizer=base.tokenizer, force_zeros_for_empty_prompt=True, **common
    )
