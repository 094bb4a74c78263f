"""Fine-tune Stable Diffusion XL (base) on your own captioned images: FSDP over every device (the
params, gradients and Adam state sharded over the "fsdp" mesh axis), bf16 compute with fp32 master
weights, remat, EMA, aspect-ratio buckets of about 1024² pixels, size/crop micro-conditioning
from each image, and prompt dropout of both text encoders (classifier-free guidance).

    python -m ldm_jax.data.image_folder my_images/ --data-dir data/ --name my_images
    python train.py --config configs/sdxl_finetune.py:path/to/sdxl --workdir runs/sdxl_ft \
        --config.data.name=my_images --config.data.data_dir=data/

The config argument is the starting checkpoint: a diffusers SDXL folder, an SGM single file
(sd_xl_base_1.0.safetensors) or a hub id (default below; downloaded once). Each image goes to the
bucket nearest its aspect ratio (SDXL's 1024² buckets in 64-px steps up to 4:1; or list your own:
--config.data.buckets="((1024, 1024), (896, 1152), (1152, 896))"); every global batch is one
bucket, so the step compiles once per bucket shape. The time ids are each image's original
(h, w), its crop's (top, left) and the bucket as target size, as SDXL was trained.
Sample grids (EMA weights, the SDXL pipeline at the model's default 1024²) every
train.sample_every steps.
"""

from ldm_jax.training.base_config import base_config, train_config

DEFAULT_CHECKPOINT = "stabilityai/stable-diffusion-xl-base-1.0"


def get_config(arg=None):
    c = base_config("ldm")
    c.workdir_default = "runs/sdxl_finetune"
    c.model.init_from = arg or DEFAULT_CHECKPOINT
    # both prompts -> "" at once (diffusers' proportion_empty_prompts); the time ids are kept
    c.diffusion.cond_drop_prob = 0.1
    c.optimizer.update(dict(learning_rate=1e-5, warmup_steps=500, schedule="constant",
                            weight_decay=1e-2, grad_clip=1.0))
    c.ema.decay = 0.9999
    c.compute_dtype = "bfloat16"  # module dtype; params, grads and Adam stay fp32
    c.remat = "save_dots_no_batch"
    c.data.update(dict(source="tfds", name="my_images", global_batch_size=32,
                       bucket_area=1024 * 1024, bucket_step=64, bucket_max_aspect=4.0,
                       bucket_max_crop=0.5, crop="random", flip=True, num_threads=16))
    c.train = train_config(num_steps=20_000, log_every=50, checkpoint_every=1000,
                           sample_every=1000)
    c.sample.update(dict(num_images=4, steps=25, guidance=5.0, sampler="euler",
                         prompts=("a photograph of an astronaut riding a horse",)))
    return c
