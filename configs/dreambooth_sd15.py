"""DreamBooth (Ruiz et al. 2023) for Stable Diffusion 1.5 with prior preservation: teach the
model one subject from a few images, captioned with a rare token ("a photo of sks dog"), while
images of its class ("a photo of dog"), drawn by the starting model into class_dir before
training, keep the class prior: loss = mse(instance) + prior_loss_weight * mse(class).

    python train.py --config configs/dreambooth_sd15.py:path/to/sd15 --workdir runs/db_dog \
        --config.data.instance_dir=dog/ --config.data.instance_prompt="a photo of sks dog" \
        --config.data.class_dir=class_dog/ --config.data.class_prompt="a photo of dog"

Full fine-tuning (the UNet; bf16 compute, fp32 master weights, FSDP). The same run as a LoRA:
add --config.lora.rank=16 --config.optimizer.learning_rate=1e-4 (adapters on the UNet's
attention projections, exported to <workdir>/lora/ with every checkpoint). class_dir is topped up to
data.num_class_images with the config's sample settings (images it already holds are used and
never overwritten); without class_dir the run trains without prior preservation.
"""

from ldm_jax.training.base_config import base_config, train_config

DEFAULT_CHECKPOINT = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def get_config(arg=None):
    c = base_config("ldm")
    c.workdir_default = "runs/dreambooth_sd15"
    c.model.init_from = arg or DEFAULT_CHECKPOINT
    c.diffusion.cond_drop_prob = 0.0  # diffusers' DreamBooth keeps every caption
    # lr for full fine-tuning (diffusers' example: 5e-6); LoRA: 1e-4
    c.optimizer.update(dict(learning_rate=5e-6, warmup_steps=0, schedule="constant",
                            weight_decay=1e-2, grad_clip=1.0))
    c.ema.decay = 0.0  # a few hundred steps: the weights as trained
    c.compute_dtype = "bfloat16"
    c.remat = "save_dots_no_batch"
    c.data.update(dict(source="dreambooth", instance_dir="", instance_prompt="a photo of sks dog",
                       class_dir="", class_prompt="a photo of dog", num_class_images=200,
                       prior_loss_weight=1.0, image_size=512, global_batch_size=8,
                       min_scale=1.0, max_scale=1.0, crop="center", flip=False, num_threads=4))
    c.train = train_config(num_steps=800, log_every=50, checkpoint_every=400, sample_every=400)
    c.sample.update(dict(num_images=4, steps=25, guidance=7.5, sampler="dpm++_2m_karras",
                         prompts=("a photo of sks dog on the beach",)))
    return c
