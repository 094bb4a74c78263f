"""Fine-tune Stable Diffusion 1.5 on your own captioned images (bf16 compute, fp32 master weights,
FSDP over every device, remat).

    python -m ldm_jax.data.image_folder my_images/ --data-dir data/ --name my_images
    python train.py --config configs/sd15_finetune.py:path/to/sd15 --workdir runs/sd15_ft \
        --config.data.name=my_images --config.data.data_dir=data/

The config argument is the starting checkpoint: a diffusers folder, a CompVis .safetensors/.ckpt
file or a hub id (default below; downloaded once). Images: a folder with a .txt caption beside
each image or a metadata.jsonl, turned into an array_record dataset by the first command.
"""

from ldm_jax.training.base_config import base_config, train_config

DEFAULT_CHECKPOINT = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def get_config(arg=None):
    c = base_config("ldm")
    c.workdir_default = "runs/sd15_finetune"
    c.model.init_from = arg or DEFAULT_CHECKPOINT
    c.diffusion.cond_drop_prob = 0.1  # keeps classifier-free guidance working
    c.optimizer.update(dict(learning_rate=1e-5, warmup_steps=500, schedule="constant",
                            weight_decay=1e-2, grad_clip=1.0))
    c.ema.decay = 0.9999
    c.compute_dtype = "bfloat16"
    c.remat = "save_dots_no_batch"  # 14.8 GiB per device at 8 images (BENCHMARKS.md)
    c.data.update(dict(source="tfds", name="my_images", image_size=512, global_batch_size=32,
                       min_scale=1.0, max_scale=1.2, crop="random", flip=True, num_threads=16))
    c.train = train_config(num_steps=20_000, log_every=50, checkpoint_every=1000,
                           sample_every=1000)
    c.sample.update(dict(num_images=4, steps=25, guidance=7.5, sampler="dpm++_2m_karras",
                         prompts=("a photograph of an astronaut riding a horse",)))
    return c
