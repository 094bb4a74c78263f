"""Train a LoRA for Stable Diffusion 1.5 on your own captioned images: rank-16 adapters on the
UNet's attention projections (optionally the text encoder's too), every network frozen and
sharded (FSDP), bf16 compute; only the adapters and their Adam moments are trained and
checkpointed. Every checkpoint writes them to <workdir>/lora/peft.safetensors (diffusers / PEFT) and
kohya.safetensors (A1111, ComfyUI), which `sample.py --lora` and diffusers' load_lora_weights read.

    python -m ldm_jax.data.image_folder my_images/ --data-dir data/ --name my_images
    python train.py --config configs/lora_sd15.py:path/to/sd15 --workdir runs/lora_sd15 \
        --config.data.name=my_images --config.data.data_dir=data/ \
        [--config.lora.rank=32] \
        [--config.lora.text_encoder_targets="('q_proj','k_proj','v_proj','out_proj')"]

The config argument is the base checkpoint (a diffusers folder, a CompVis file or a hub id;
default below). DreamBooth: --config.data.source=dreambooth (configs/dreambooth_sd15.py).
"""

from ldm_jax.training.base_config import base_config, train_config

DEFAULT_CHECKPOINT = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def get_config(arg=None):
    c = base_config("ldm")
    c.workdir_default = "runs/lora_sd15"
    c.model.init_from = arg or DEFAULT_CHECKPOINT
    # PEFT's target_modules on diffusers' names: every attention projection of the UNet
    c.lora.update(dict(rank=16, alpha=16.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                       text_encoder_targets=(), export_formats=("peft", "kohya")))
    c.diffusion.cond_drop_prob = 0.0  # the base model already handles the empty prompt
    c.optimizer.update(dict(learning_rate=1e-4, warmup_steps=0, schedule="constant",
                            weight_decay=1e-2, grad_clip=1.0))
    c.ema.decay = 0.0  # the adapters as trained (no EMA): what is exported and sampled
    c.compute_dtype = "bfloat16"  # module dtype; frozen weights, adapters and Adam stay fp32
    c.remat = "blocks"
    c.data.update(dict(source="tfds", name="my_images", image_size=512, global_batch_size=8,
                       min_scale=1.0, max_scale=1.2, crop="random", flip=True, num_threads=16))
    c.train = train_config(num_steps=2_000, log_every=50, checkpoint_every=500,
                           sample_every=500)
    c.sample.update(dict(num_images=4, steps=25, guidance=7.5, sampler="dpm++_2m_karras",
                         prompts=("a photograph of an astronaut riding a horse",)))
    return c
