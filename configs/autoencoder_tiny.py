"""A tiny KL autoencoder (f4, 32 px) with the patch-GAN on the built-in shapes data: CPU runs.

    python train.py --config configs/autoencoder_tiny.py --workdir runs/autoencoder_tiny \
        [--config.train.num_steps=20] [--config.loss.lpips_weights=lpips.safetensors \
         --config.loss.perceptual_weight=1.0]

No LPIPS by default (its VGG16 weights are a download; see ldm_jax/training/lpips_weights.py);
the discriminator switches on at step 50. Same code path as the published configs.
"""

from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.spec import ModelSpec, spec_to_dict
from ldm_jax.training.autoencoder_task import loss_config
from ldm_jax.training.base_config import base_config, train_config

TINY_FIRST_STAGE = AutoencoderConfig(
    ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4
)


def get_config(arg=None):
    del arg
    c = base_config("autoencoder")
    c.workdir_default = "runs/autoencoder_tiny"
    c.model.spec = spec_to_dict(ModelSpec(first_stage=TINY_FIRST_STAGE))
    c.loss = loss_config(perceptual_weight=0.0, disc_start=50, kl_weight=1e-6, disc_weight=0.5,
                         disc_num_layers=2, disc_ndf=16)
    c.optimizer.update(dict(learning_rate=1e-3, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip=0.0))
    c.ema.decay = 0.99
    c.data.update(dict(source="shapes", image_size=32, global_batch_size=8, num_threads=0,
                       flip=False))
    c.train = train_config(num_steps=100, log_every=10, checkpoint_every=50, sample_every=50)
    c.sample.num_images = 8
    return c
