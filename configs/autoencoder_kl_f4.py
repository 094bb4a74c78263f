"""The published kl-f4 first stage (CompVis), trained with its published loss settings.

    python -m ldm_jax.training.lpips_weights --vgg16 vgg16.pth --heads vgg.pth \
        --out lpips.safetensors
    python train.py --config configs/autoencoder_kl_f4.py --workdir runs/autoencoder_kl-f4 \
        --config.data.folder=/path/to/images [--config.data.global_batch_size=64]

Architecture from ldm_jax/presets/autoencoders.py; loss from PUBLISHED_LOSSES in
ldm_jax/training/autoencoder_task.py; Adam (0.5, 0.9) at 4.5e-6 x the global batch (CompVis'
scaled learning rate; set optimizer.learning_rate when changing the batch).
"""

from ldm_jax.training.autoencoder_task import published_config


def get_config(arg=None):
    del arg
    return published_config("kl-f4")
