"""DreamBooth in the LDM trainer: the starting model draws the missing class images into
class_dir (never touching the user's), each step trains on the instance half and the class half
with diffusers' loss mse(instance) + λ·mse(class), as full fine-tuning and as a LoRA."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from support.tiny_specs import random_params

from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.training import loop, tasks
from ldm_jax.training.config_checks import ConfigError, check_config
from ldm_jax.training.config_overrides import load_config
from ldm_jax.training.dreambooth_setup import stack_prior_half
from ldm_jax.training.ldm_loss import diffusion_loss

ROOT = Path(__file__).resolve().parents[1]


def folders(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    instance, classes = tmp_path / "instance", tmp_path / "class"
    instance.mkdir()
    classes.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), np.uint8)).save(instance / f"{i}.png")
    # the user's own class image: used, never overwritten
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(classes / "mine.jpg")
    return instance, classes


def dreambooth_config(instance, classes, **lora):
    config = load_config(str(ROOT / "configs" / "ldm_tiny.py"))
    config.data.update(dict(source="dreambooth", instance_dir=str(instance),
                            instance_prompt="a photo of sks circle", class_dir=str(classes),
                            class_prompt="a photo of a circle", num_class_images=4,
                            prior_loss_weight=0.5, global_batch_size=8))
    config.diffusion.cond_drop_prob = 0.0
    config.lora.update(lora)
    config.sample.update(dict(steps=2, sampler="ddim", guidance=1.0))
    config.train.update(dict(num_steps=1, log_every=1, checkpoint_every=1, sample_every=0,
                             async_checkpointing=False, progress_bar=False))
    return config


@pytest.mark.slow  # two tiny runs on 8 fake devices, ~2 min on 2 cores
def test_dreambooth_draws_class_images_once_and_trains_full_and_lora(tmp_path):
    instance, classes = folders(tmp_path)
    mine = (classes / "mine.jpg").read_bytes()
    config = dreambooth_config(instance, classes)
    check_config(config)
    task = tasks.make_task(config)
    task.init_params = random_params(task.spec)  # "pretrained": draws the class images
    batches = task.make_iterator()
    drawn = sorted(p.name for p in classes.iterdir())
    assert drawn == ["class_00001.png", "class_00002.png", "class_00003.png", "mine.jpg"]
    assert (classes / "mine.jpg").read_bytes() == mine
    assert Image.open(classes / "class_00001.png").size == (32, 32)  # data.image_size
    batch = next(batches)
    batches.close()
    # 8 instance rows then 8 class rows on the devices, weighted 2 and 2 * 0.5
    assert batch["image"].shape == (16, 32, 32, 3) and batch["tokens"].shape == (16, 16)
    np.testing.assert_array_equal(np.asarray(batch["loss_weight"]), [2.0] * 8 + [1.0] * 8)
    tokens = np.asarray(batch["tokens"])
    assert (tokens[:8] == tokens[0]).all() and (tokens[8:] == tokens[8]).all()
    assert not (tokens[0] == tokens[8]).all()  # instance and class prompts

    full = loop.run(config, tmp_path / "full", task)
    assert full.step == 1 and np.isfinite(full.metrics["loss"])
    assert sorted(p.name for p in classes.iterdir()) == drawn  # nothing drawn twice

    lora_config = dreambooth_config(instance, classes, rank=2, alpha=2.0)
    lora_task = tasks.make_task(lora_config)
    lora_task.init_params = random_params(lora_task.spec)
    lora_run = loop.run(lora_config, tmp_path / "lora", lora_task)
    assert np.isfinite(lora_run.metrics["loss"])
    assert (tmp_path / "lora" / "lora" / "peft.safetensors").is_file()
    assert sorted(p.name for p in classes.iterdir()) == drawn


def test_the_weighted_loss_is_instance_mean_plus_lambda_class_mean():
    schedule = make_schedule("linear", 1000, 0.00085, 0.012)
    x0 = jax.random.normal(jax.random.key(1), (4, 2, 2, 1))

    def apply_fn(x_t, t_B):
        return 0.5 * x_t + 1e-3 * t_B[:, None, None, None]

    def per_example():  # the same t and noise as diffusion_loss draws for a batch of 4
        return [
            4 * float(diffusion_loss(apply_fn, schedule, x0, jax.random.key(0),
                                     weights_B=jnp.eye(4)[i]))
            for i in range(4)
        ]  # fmt: skip

    losses = per_example()
    weighted = diffusion_loss(apply_fn, schedule, x0, jax.random.key(0),
                              weights_B=jnp.array([2.0, 2.0, 1.5, 1.5]))
    expected = np.mean(losses[:2]) + 0.75 * np.mean(losses[2:])  # lambda 0.75
    np.testing.assert_allclose(float(weighted), expected, rtol=1e-6)


def test_stacking_keeps_each_half_and_needs_matching_keys():
    batch = {"image": np.zeros((2, 4, 4, 3)), "tokens": np.ones((2, 3)),
             "prior_image": np.ones((2, 4, 4, 3)), "prior_tokens": np.zeros((2, 3))}
    stacked = stack_prior_half(batch, 0.25)
    assert stacked["image"].shape == (4, 4, 4, 3)
    np.testing.assert_array_equal(stacked["tokens"][:, 0], [1, 1, 0, 0])
    np.testing.assert_array_equal(stacked["loss_weight"], [2, 2, 0.5, 0.5])
    plain = {"image": np.zeros((2, 4, 4, 3))}
    assert stack_prior_half(plain, 1.0) is plain
    with pytest.raises(ValueError, match="differ"):
        stack_prior_half({"image": np.zeros((2,)), "prior_tokens": np.zeros((2,))}, 1.0)


def test_dreambooth_settings_fail_before_any_work(tmp_path):
    config = dreambooth_config(tmp_path, tmp_path)
    config.data.class_prompt = ""
    with pytest.raises(ConfigError, match="data.class_prompt is empty"):
        check_config(config)


def test_class_images_need_a_pretrained_starting_model(tmp_path):
    instance, classes = folders(tmp_path)
    task = tasks.make_task(dreambooth_config(instance, classes))
    with pytest.raises(ValueError, match="class images are drawn by the starting model"):
        task.make_iterator()
    assert sorted(p.name for p in classes.iterdir()) == ["mine.jpg"]
