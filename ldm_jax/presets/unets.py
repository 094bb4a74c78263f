"""Hyper-parameters of the published latent UNets (`unet_config.params` of the original yamls).

Sources: CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml (SD 1.x; the
inpainting model of runwayml's v1-inpainting-inference.yaml only takes 9 input channels: latent,
mask, masked-image latent), Stability-AI/stablediffusion configs/stable-diffusion/
v2-inference.yaml and v2-inference-v.yaml (one UNet, two prediction types), and the LDM model zoo
of CompVis/latent-diffusion: models/ldm/{celeba256,ffhq256,lsun_beds256,lsun_churches256,bsr_sr,
inpainting_big,semantic_synthesis256}/config.yaml, configs/latent-diffusion/cin256-v2.yaml and
txt2img-1p4B-eval.yaml.

What the network predicts (eps or v) is a property of the training objective, not of the
network: `PREDICTION_TYPES` records it for each preset so samplers can pick the right conversion.
"""

import dataclasses

from ldm_jax.models.unet import UNetConfig

_SD_V1 = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=(4, 2, 1),
    num_res_blocks=2,
    channel_mult=(1, 2, 4, 4),
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    legacy=False,
)

_SD_V2 = dataclasses.replace(
    _SD_V1,
    num_heads=-1,
    num_head_channels=64,
    use_linear_in_transformer=True,
    context_dim=1024,
)

# SDXL (Stability-AI/generative-models configs/inference/sd_xl_base.yaml, sd_xl_refiner.yaml;
# diffusers stabilityai/stable-diffusion-xl-{base,refiner}-1.0 unet/config.json): 64-channel
# heads, linear proj_in/out, no attention at the first level (SGM's unused depth 1 kept there),
# the two text encoders' penultimate states side by side as context, and y = SDXL's text_time
# vector (models/text_time.py) through the adm MLP. 128x128 latents (1024 px).
_SDXL_BASE = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=(4, 2),
    num_res_blocks=2,
    channel_mult=(1, 2, 4),
    num_head_channels=64,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=(1, 2, 10),
    context_dim=2048,  # CLIP ViT-L/14 (768) + OpenCLIP ViT-bigG/14 (1280)
    num_classes="sequential",
    adm_in_channels=2816,  # bigG pooled 1280 + 6 time ids x 256
    addition_time_embed_dim=256,
    legacy=False,
)
_SDXL_REFINER = dataclasses.replace(
    _SDXL_BASE,
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    transformer_depth=4,
    context_dim=1280,  # OpenCLIP ViT-bigG/14 only
    adm_in_channels=2560,  # bigG pooled 1280 + 5 time ids (with the aesthetic score) x 256
)

# celebahq, ffhq and lsun-bedrooms share one UNet on VQ-f4 latents (64x64x3).
_LDM_VQ_F4 = UNetConfig(
    in_channels=3,
    out_channels=3,
    model_channels=224,
    attention_resolutions=(8, 4, 2),
    num_res_blocks=2,
    channel_mult=(1, 2, 3, 4),
    num_head_channels=32,
)

UNET_PRESETS: dict[str, UNetConfig] = {
    "sd-v1": _SD_V1,  # 859,520,964 parameters
    "sd-v1-inpainting": dataclasses.replace(_SD_V1, in_channels=9),
    "sd-v2-base": _SD_V2,  # 512px, eps prediction
    "sd-v2-768-v": _SD_V2,  # 768px, v prediction: the same network
    "sdxl-base": _SDXL_BASE,  # 2,567,463,684 parameters
    "sdxl-refiner": _SDXL_REFINER,  # 2,259,526,660 parameters
    "ldm-celebahq-256": _LDM_VQ_F4,
    "ldm-ffhq-256": _LDM_VQ_F4,
    "ldm-lsun-bedrooms-256": _LDM_VQ_F4,
    # KL-f8 latents (32x32x4), 5 levels with FiLM (scale-shift) norm and resblock resampling.
    "ldm-lsun-churches-256": UNetConfig(
        in_channels=4,
        out_channels=4,
        model_channels=192,
        attention_resolutions=(1, 2, 4, 8),
        num_res_blocks=2,
        channel_mult=(1, 2, 2, 4, 4),
        num_heads=8,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
    # Class-conditional ImageNet: a ClassEmbedder's one-token context (1001 classes incl. null).
    "ldm-cin256-v2": UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=192,
        attention_resolutions=(8, 4, 2),
        num_res_blocks=2,
        channel_mult=(1, 2, 3, 5),
        num_heads=1,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=512,
    ),
    # The paper's 1.45B text-to-image model, conditioned on the LDM BERT (1280 wide).
    "ldm-txt2img-1p4b": dataclasses.replace(_SD_V1, context_dim=1280),
    # 4x super-resolution: noisy latent concatenated with the low-res image (3 + 3 channels).
    "ldm-bsr-sr": UNetConfig(
        in_channels=6,
        out_channels=3,
        model_channels=160,
        attention_resolutions=(16, 8),
        num_res_blocks=2,
        channel_mult=(1, 2, 2, 4),
        num_head_channels=32,
    ),
    # Inpainting: latent + masked-image latent + mask (3 + 3 + 1 channels).
    "ldm-inpainting-big": UNetConfig(
        in_channels=7,
        out_channels=3,
        model_channels=256,
        attention_resolutions=(8, 4, 2),
        num_res_blocks=2,
        channel_mult=(1, 2, 3, 4),
        num_heads=8,
        resblock_updown=True,
    ),
    # Semantic synthesis: latent + rescaled segmentation map (3 + 3). Its attention resolutions
    # exceed the deepest ds (4), so attention only runs in the middle block, as in the original.
    "ldm-semantic-synthesis-256": UNetConfig(
        in_channels=6,
        out_channels=3,
        model_channels=128,
        attention_resolutions=(32, 16, 8),
        num_res_blocks=2,
        channel_mult=(1, 4, 8),
        num_heads=8,
    ),
}

PREDICTION_TYPES: dict[str, str] = {name: "eps" for name in UNET_PRESETS} | {"sd-v2-768-v": "v"}
