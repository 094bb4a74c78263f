"""A first stage (autoencoder + patch-GAN) trained alone: a published CompVis one, or a tiny one.

    python -m ldm_jax.training.lpips_weights --vgg16 vgg16.pth --heads vgg.pth \
        --out lpips.safetensors
    python train.py --config configs/autoencoder.py:kl-f8 --workdir runs/kl-f8 \
        --config.data.folder=/path/to/images [--config.data.global_batch_size=64]
    python train.py --config configs/autoencoder.py:tiny --workdir runs/autoencoder_tiny \
        [--config.train.num_steps=20]      # CPU-sized, on the built-in shapes data

The argument is one of kl-f4, kl-f8, kl-f16, kl-f32, vq-f4, vq-f8, vq-f16 (architecture from
ldm_jax/presets/autoencoders.py; loss from PUBLISHED_LOSSES in ldm_jax/training/autoencoder_task.py;
Adam (0.5, 0.9) at 4.5e-6 x the global batch, CompVis' scaled learning rate: set
optimizer.learning_rate when changing the batch), or tiny: a KL f4 at 32 px with no LPIPS (its
VGG16 weights are a download; add --config.loss.lpips_weights=lpips.safetensors
--config.loss.perceptual_weight=1.0) and the discriminator from step 50, the same code path.
"""

from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.spec import ModelSpec, spec_to_dict
from ldm_jax.training.autoencoder_task import PUBLISHED_LOSSES, loss_config, published_config
from ldm_jax.training.base_config import base_config, train_config

TINY_FIRST_STAGE = AutoencoderConfig(
    ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4
)
PUBLISHED = tuple(PUBLISHED_LOSSES)  # kl-f4, kl-f8, kl-f16, kl-f32, vq-f4, vq-f8, vq-f16


def get_config(arg=None):
    if arg == "tiny":
        return tiny_config()
    if arg not in PUBLISHED:
        raise ValueError(f"unknown configs/autoencoder.py argument {arg!r}; allowed: "
                         f"{', '.join((*PUBLISHED, 'tiny'))} (e.g. configs/autoencoder.py:kl-f8)")
    return published_config(arg)


def tiny_config():
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
