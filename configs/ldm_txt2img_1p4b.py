"""The paper's text-to-image LDM (LDM-KL-8-G, 1.45B): a KL-f8 autoencoder kept frozen, a UNet
with 1280-wide cross-attention and the 32-layer LDM-BERT text encoder trained jointly, from scratch.

    python train.py --config configs/ldm_txt2img_1p4b.py --workdir runs/txt2img \
        --config.model.first_stage_from=path/to/kl-f8 --config.model.tokenizer=bert-base-uncased \
        --config.data.name=<tfds captioned images> --config.data.data_dir=<dir>

Rombach et al. 2022, Table 13: 256² images, batch 680, lr 1e-4 (scaled by batch in CompVis; set
it directly here), EMA 0.9999, 32x32x4 latents. `first_stage_from` is the trained autoencoder
(an ldm_jax autoencoder run's export, e.g. of configs/autoencoder.py:kl-f8, or CompVis's kl-f8);
`tokenizer` gives the BERT vocabulary.
"""

from ldm_jax.presets.autoencoders import AUTOENCODER_PRESETS
from ldm_jax.presets.text_encoders import ldm_bert_preset
from ldm_jax.presets.unets import UNET_PRESETS
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec, spec_to_dict
from ldm_jax.training.base_config import base_config, train_config

SPEC = ModelSpec(
    first_stage=AUTOENCODER_PRESETS["kl-f8"],
    unet=UNET_PRESETS["ldm-txt2img-1p4b"],
    cond_stage=CondStageSpec("ldm_bert", ldm_bert_preset("ldm-bert-txt2img-1p4b"), trainable=True),
    diffusion=DiffusionSpec(linear_start=0.00085, linear_end=0.012, scale_factor=0.18215,
                            latent_size=32),
)


def get_config(arg=None):
    del arg
    c = base_config("ldm")
    c.workdir_default = "runs/ldm_txt2img_1p4b"
    c.model.spec = spec_to_dict(SPEC)
    c.model.tokenizer = "bert-base-uncased"
    c.diffusion.cond_drop_prob = 0.1
    c.optimizer.update(dict(learning_rate=1e-4, warmup_steps=10_000, weight_decay=0.0))
    c.compute_dtype = "bfloat16"
    c.remat = "blocks"
    c.data.update(dict(source="tfds", image_size=256, global_batch_size=680, num_threads=16))
    # fsdp within each slice, data parallel across TPU slices (-1: however many there are, one
    # on a single host); GPU hosts: add --config.mesh.process_is_granule=True
    c.mesh.update(dict(shape=(1, -1, 1), dcn_shape=(-1, 1, 1)))
    c.train = train_config(num_steps=400_000, log_every=100, checkpoint_every=5000,
                           sample_every=5000)
    c.sample.update(dict(num_images=8, steps=50, guidance=5.0,
                         prompts=("a painting of a virus monster playing guitar",)))
    return c
