"""Stable Diffusion 1.x architecture trained from scratch (random UNet; frozen CLIP ViT-L/14 text
and KL-f8 autoencoder), e.g. on the built-in shapes data: a throughput / MFU benchmark and the
template for a from-scratch SD run on your data.

    python train.py --config configs/sd15_scratch.py --workdir runs/sd15_scratch \
        [--config.model.first_stage_from=path/to/sd-or-kl-f8] [--config.data.image_size=256]

Without `first_stage_from` the autoencoder is random too (fine for timing, useless for images).
The CLIP text encoder is random as well unless `init_from`-style weights are given: for real
training start from configs/sd15_finetune.py instead.
"""

from ldm_jax.presets.autoencoders import SD_VAE
from ldm_jax.presets.text_encoders import clip_text_preset
from ldm_jax.presets.unets import UNET_PRESETS
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec, spec_to_dict
from ldm_jax.training.base_config import base_config, train_config

SPEC = ModelSpec(
    first_stage=SD_VAE,
    unet=UNET_PRESETS["sd-v1"],
    cond_stage=CondStageSpec("clip", clip_text_preset("clip-vit-l-14")),
    diffusion=DiffusionSpec(),
)


def get_config(arg=None):
    del arg
    c = base_config("ldm")
    c.workdir_default = "runs/sd15_scratch"
    c.model.spec = spec_to_dict(SPEC)
    c.optimizer.update(dict(learning_rate=1e-4, warmup_steps=1000))
    c.compute_dtype = "bfloat16"
    c.remat = "none"
    c.data.update(dict(source="shapes", image_size=256, global_batch_size=16, num_threads=8))
    c.train = train_config(num_steps=1000, log_every=10, checkpoint_every=500)
    c.sample.update(dict(num_images=4, steps=25, guidance=7.5,
                         prompts=("a red circle above a blue square",)))
    return c
