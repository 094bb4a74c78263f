"""Hyper-parameters of the published conditioning encoders (text transformers, class embedders).

Sources: HF configs of openai/clip-vit-large-patch14 (SD 1.x `cond_stage_model`), OpenCLIP
ViT-H-14 (SD 2.x, Stability-AI configs/stable-diffusion/v2-inference*.yaml: FrozenOpenCLIPEmbedder
layer "penultimate"), SDXL's two encoders (stabilityai/stable-diffusion-xl-base-1.0 text_encoder,
text_encoder_2 config.json; Stability-AI/generative-models sd_xl_base.yaml: FrozenCLIPEmbedder
layer "hidden" layer_idx -2, FrozenOpenCLIPEmbedder2 ViT-bigG-14 layer "penultimate" legacy False,
always_return_pooled), CompVis configs/latent-diffusion/txt2img-1p4B-eval.yaml (BERTEmbedder n_embed
1280, n_layer 32) and models/ldm/cin256*/config.yaml (ClassEmbedder embed_dim 512).
"""

from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.conditioning import ClassEmbedderConfig
from ldm_jax.models.ldm_bert import LDMBertConfig

CLIP_TEXT_PRESETS: dict[str, CLIPTextConfig] = {
    # SD 1.x: OpenAI CLIP ViT-L/14 text tower, last layer (123,060,480 parameters).
    "clip-vit-l-14": CLIPTextConfig(
        vocab_size=49408,
        max_length=77,
        width=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        activation="quick_gelu",
    ),
    # SD 2.x as CompVis/Stability run it: all 24 OpenCLIP ViT-H/14 blocks exist in the
    # checkpoint, the output is final_layer_norm of the penultimate block's output.
    "openclip-vit-h-14": CLIPTextConfig(
        vocab_size=49408,
        max_length=77,
        width=1024,
        num_layers=24,
        num_heads=16,
        mlp_dim=4096,
        activation="gelu",
        skip_last_layers=1,
    ),
    # SD 2.x as diffusers ships it (`text_encoder` folder): the last block is dropped from the
    # checkpoint, so 23 blocks and no skip compute the same output.
    "openclip-vit-h-14-diffusers": CLIPTextConfig(
        vocab_size=49408,
        max_length=77,
        width=1024,
        num_layers=23,
        num_heads=16,
        mlp_dim=4096,
        activation="gelu",
    ),
    # SDXL text encoder 1: CLIP ViT-L/14, penultimate block's output WITHOUT the final LayerNorm.
    "clip-vit-l-14-sdxl": CLIPTextConfig(
        vocab_size=49408,
        max_length=77,
        width=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        activation="quick_gelu",
        skip_last_layers=1,
        final_norm_on_output=False,
    ),
    # SDXL text encoder 2 (and the refiner's only one): OpenCLIP ViT-bigG/14 as transformers'
    # CLIPTextModelWithProjection, penultimate output without the final LayerNorm; text_embeds
    # (last layer, final LayerNorm, text_projection) is the pooled input of the text_time vector.
    "openclip-vit-bigg-14": CLIPTextConfig(
        vocab_size=49408,
        max_length=77,
        width=1280,
        num_layers=32,
        num_heads=20,
        mlp_dim=5120,
        activation="gelu",
        skip_last_layers=1,
        final_norm_on_output=False,
        projection_dim=1280,
    ),
}

LDM_BERT_PRESETS: dict[str, LDMBertConfig] = {
    # LDM text-to-image 1.45B (CompVis txt2img-1p4B; diffusers CompVis/ldm-text2im-large-256 bert).
    "ldm-bert-txt2img-1p4b": LDMBertConfig(
        vocab_size=30522,
        max_length=77,
        width=1280,
        num_layers=32,
        num_heads=8,
        head_dim=64,
        mlp_dim=5120,
    ),
}

CLASS_EMBEDDER_PRESETS: dict[str, ClassEmbedderConfig] = {
    # CompVis cin256: 1000 ImageNet classes, no null class.
    "cin256": ClassEmbedderConfig(n_classes=1000, embed_dim=512),
    # cin256-v2: one extra class (id 1000) that stands for "no label" (classifier-free guidance).
    "cin256-v2": ClassEmbedderConfig(n_classes=1001, embed_dim=512, null_class=1000),
}


def _lookup(presets: dict, name: str, family: str):
    if name not in presets:
        raise ValueError(f"unknown {family} preset {name!r}; allowed: {sorted(presets)}")
    return presets[name]


def clip_text_preset(name: str) -> CLIPTextConfig:
    return _lookup(CLIP_TEXT_PRESETS, name, "CLIP text")


def ldm_bert_preset(name: str) -> LDMBertConfig:
    return _lookup(LDM_BERT_PRESETS, name, "LDMBert")


def class_embedder_preset(name: str) -> ClassEmbedderConfig:
    return _lookup(CLASS_EMBEDDER_PRESETS, name, "class embedder")
