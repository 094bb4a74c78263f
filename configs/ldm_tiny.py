"""A tiny text-to-image LDM (SD 1.x layout, random init) on the built-in shapes data: CPU tests.

    python train.py --config configs/ldm_tiny.py --workdir runs/ldm_tiny \
        [--config.train.num_steps=20] [--config.sample.num_images=4]

Seconds per step on a laptop CPU; the same code path as the real configs (sharded state,
frozen first stage encoding images inside the step, CLIP text conditioning with dropout, EMA).
"""

from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec, spec_to_dict
from ldm_jax.training.base_config import base_config, train_config

TINY_SPEC = ModelSpec(
    first_stage=AutoencoderConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4
    ),
    unet=UNetConfig(
        in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2,), num_heads=2, use_spatial_transformer=True, context_dim=64,
        legacy=False,
    ),
    # the packaged CLIP BPE vocabulary (49,408 tokens), a 2-layer 64-wide text tower
    cond_stage=CondStageSpec(
        "clip",
        CLIPTextConfig(vocab_size=49408, max_length=16, width=64, num_layers=2, num_heads=1,
                       mlp_dim=128),
    ),
    diffusion=DiffusionSpec(scale_factor=1.0),
)


def get_config(arg=None):
    del arg
    c = base_config("ldm")
    c.workdir_default = "runs/ldm_tiny"
    c.model.spec = spec_to_dict(TINY_SPEC)
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=2))
    c.ema.decay = 0.99
    c.data.update(dict(source="shapes", image_size=32, global_batch_size=8, num_threads=0,
                       flip=False))
    c.train = train_config(num_steps=20, log_every=5, checkpoint_every=10)
    c.sample.update(dict(num_images=4, prompts=("a red circle", "a blue square"), steps=4,
                         guidance=1.0))
    return c
