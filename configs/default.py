"""The built-in default: `python train.py` (no flags) trains a text-to-image LDM on the shapes data.

    python train.py                                   # = --config configs/default.py
    python train.py --config configs/default.py --workdir runs/default [--config.key=value]
    python train.py --config configs/default.py:ci    # seconds: the CI smoke test's sizes

Offline, on CPU: stage 1 trains a small KL autoencoder (f4: 32x32x3 images -> 8x8x4 latents) on the
built-in captioned shapes images (L1 + KL; no LPIPS, whose VGG weights would need a download, and
no discriminator); stage 2 trains a small text-conditioned UNet on its latents with a 2-layer
CLIP-architecture text transformer trained jointly from scratch (packaged CLIP BPE tokenizer).
Everything lands in the workdir (runs/default): autoencoder/ and ldm/ (checkpoints, metrics,
TensorBoard), first_stage/ (the exported autoencoder), model/ (the final checkpoint, EMA weights,
orbax: `python sample.py --prompt "..."` uses it), samples.png (the SAMPLE_PROMPTS grid).

config.first_stage.* is stage 1; the rest of the config (model, optimizer, data, train, sample, ...)
is stage 2. Sizes target <= 20 minutes on 2 CPU cores in all. Measured process CPU time per step
(jax 0.10 CPU, on a shared box): stage 1 at ch 32 (1, 2, 2) batch 32 took 0.95 CPU-s (39 GFLOP), so
it is (1, 1, 2) at batch 16 (~0.3 CPU-s); stage 2 (22.5 GFLOP/step at batch 32, incl. encoding the
images) took 0.62 CPU-s at batch 32, so batch 24 (~0.45 CPU-s, ~0.3 s on 2 idle cores). Budget:
~2.5 min stage 1 + ~12-13 min stage 2 + ~2-3 min compiling, exporting and sampling the grid.
"""

import ml_collections

from ldm_jax.checkpoints.spec import CondStageSpec, DiffusionSpec, ModelSpec, spec_to_dict
from ldm_jax.data.shapes import SAMPLE_PROMPTS
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.training.base_config import base_config, train_config

IMAGE_SIZE = 32
FIRST_STAGE = AutoencoderConfig(
    ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=IMAGE_SIZE, z_channels=4, embed_dim=4
)
SPEC = ModelSpec(
    first_stage=FIRST_STAGE,
    unet=UNetConfig(
        in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(1, 2), num_head_channels=32, use_spatial_transformer=True,
        context_dim=128, legacy=False,
    ),
    # a 2-layer CLIP-architecture text tower trained with the UNet; the packaged 49,408-token BPE
    # vocabulary. Bidirectional (causal=False), like the paper's BERT-like encoder: with CLIP's
    # causal mask the tokens of "a red circle above ..." cannot see "above", and a GPU probe left
    # position at chance (~50%) while colour and shape were learnt.
    cond_stage=CondStageSpec(
        "clip",
        CLIPTextConfig(vocab_size=49408, max_length=16, width=128, num_layers=2, num_heads=4,
                       mlp_dim=512, causal=False),
        trainable=True,
    ),
    # latent_size: 32 px / f4; scale_factor is measured from the first batch (scale_by_std)
    diffusion=DiffusionSpec(latent_size=IMAGE_SIZE // FIRST_STAGE.downsample_factor),
)
# the CI smoke test's networks: the same code path, a fraction of the compute
CI_SPEC = ModelSpec(
    first_stage=AutoencoderConfig(
        ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, resolution=IMAGE_SIZE, z_channels=4,
        embed_dim=4, mid_attention=False,
    ),
    unet=UNetConfig(
        in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
        attention_resolutions=(2,), num_head_channels=32, use_spatial_transformer=True,
        context_dim=32, legacy=False,
    ),
    cond_stage=CondStageSpec(
        "clip",
        CLIPTextConfig(vocab_size=49408, max_length=16, width=32, num_layers=1, num_heads=1,
                       mlp_dim=64, causal=False),
        trainable=True,
    ),
    diffusion=DiffusionSpec(latent_size=8),
)


def first_stage_config() -> ml_collections.ConfigDict:
    """config.first_stage: stage 1 (autoencoder) training."""
    return ml_collections.ConfigDict({
        "global_batch_size": 16,
        # Adam betas (0.5, 0.9) as CompVis' autoencoders; no weight decay
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 50, "schedule": "cosine",
                      "end_learning_rate_factor": 0.1, "b1": 0.5, "b2": 0.9,
                      "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0, "grad_accum_steps": 1},
        # L1 + kl_weight * KL; perceptual_weight 0: LPIPS needs VGG weights (a download);
        # disc_start beyond the run: the patch-GAN never switches on (kept tiny, it still runs)
        "loss": {"kl_weight": 1e-6, "perceptual_weight": 0.0, "disc_start": 10**9,
                 "disc_weight": 0.5, "disc_num_layers": 1, "disc_ndf": 8},
        "ema_decay": 0.0,  # 0: no EMA (the cosine schedule ends at a tenth of the rate)
        "train": train_config(num_steps=800, log_every=100, checkpoint_every=400),
    })


def get_config(arg=None):
    if arg not in (None, "", "ci"):
        raise ValueError(f"unknown configs/default.py argument {arg!r}; allowed: 'ci' (or none)")
    c = base_config("default")
    c.workdir_default = "runs/default"
    c.model.spec = spec_to_dict(SPEC)
    c.first_stage = first_stage_config()
    c.diffusion.update(dict(cond_drop_prob=0.1, scale_by_std=True, min_snr_gamma=5.0))
    c.optimizer.update(dict(learning_rate=5e-4, warmup_steps=100, schedule="cosine",
                            end_learning_rate_factor=0.1, weight_decay=0.0))
    c.ema.decay = 0.999
    # left/right captions: no horizontal flips
    c.data.update(dict(source="shapes", image_size=IMAGE_SIZE, global_batch_size=24, flip=False,
                       num_threads=2))
    c.train = train_config(num_steps=2500, log_every=100, checkpoint_every=500)
    c.sample.update(dict(num_images=2 * len(SAMPLE_PROMPTS), prompts=SAMPLE_PROMPTS, steps=50,
                         sampler="ddim", guidance=4.0))
    if arg == "ci":
        c.model.spec = spec_to_dict(CI_SPEC)
        c.first_stage.global_batch_size = 8
        c.first_stage.optimizer.warmup_steps = 0
        c.first_stage.train = train_config(num_steps=2, log_every=1, checkpoint_every=0,
                                           async_checkpointing=False, progress_bar=False)
        c.optimizer.warmup_steps = 0
        c.data.update(dict(global_batch_size=8, num_threads=0))
        c.train = train_config(num_steps=2, log_every=1, checkpoint_every=0,
                               async_checkpointing=False, progress_bar=False)
        c.sample.update(dict(num_images=4, steps=2))
    return c
