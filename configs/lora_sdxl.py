"""Train a LoRA for Stable Diffusion XL (base): rank-32 adapters on the UNet's attention
projections (both text encoders optional), every network frozen and sharded (FSDP), bf16
compute, aspect-ratio buckets of ~1024² with SDXL's size/crop micro-conditioning. Only the
adapters and their Adam moments are trained and checkpointed; every checkpoint writes
<workdir>/lora/peft.safetensors and kohya.safetensors (lora_unet_ / lora_te1_ / lora_te2_).

    python -m ldm_jax.data.image_folder my_images/ --data-dir data/ --name my_images
    python train.py --config configs/lora_sdxl.py:path/to/sdxl --workdir runs/lora_sdxl \
        --config.data.name=my_images --config.data.data_dir=data/

The config argument is the base checkpoint (a diffusers SDXL folder, an SGM single file or a hub
id; default below).
"""

from ldm_jax.training.base_config import base_config, train_config

DEFAULT_CHECKPOINT = "stabilityai/stable-diffusion-xl-base-1.0"


def get_config(arg=None):
    c = base_config("ldm")
    c.workdir_default = "runs/lora_sdxl"
    c.model.init_from = arg or DEFAULT_CHECKPOINT
    c.lora.update(dict(rank=32, alpha=32.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                       text_encoder_targets=(), export_formats=("peft", "kohya")))
    c.diffusion.cond_drop_prob = 0.0
    c.optimizer.update(dict(learning_rate=1e-4, warmup_steps=0, schedule="constant",
                            weight_decay=1e-2, grad_clip=1.0))
    c.ema.decay = 0.0  # the adapters as trained: what is exported and sampled
    c.compute_dtype = "bfloat16"
    c.remat = "blocks"
    c.data.update(dict(source="tfds", name="my_images", global_batch_size=8,
                       bucket_area=1024 * 1024, bucket_step=64, bucket_max_aspect=4.0,
                       bucket_max_crop=0.5, crop="random", flip=True, num_threads=16))
    c.train = train_config(num_steps=2_000, log_every=50, checkpoint_every=500,
                           sample_every=500)
    c.sample.update(dict(num_images=2, steps=25, guidance=5.0, sampler="euler",
                         prompts=("a photograph of an astronaut riding a horse",)))
    return c
