"""The loop with the real latent-diffusion task (config.trainer = "ldm"): a micro SD-1.x-like
model on the built-in shapes data, 8 fake CPU devices, sharded params, sample grid from EMA."""

from pathlib import Path

import jax
import numpy as np
import pytest

from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.spec import CondStageSpec, ModelSpec, spec_to_dict
from ldm_jax.training import loop, metrics, tasks
from ldm_jax.training.checkpointing import Checkpointer
from ldm_jax.training.config_overrides import load_config

ROOT = Path(__file__).resolve().parents[1]

MICRO_SPEC = ModelSpec(
    first_stage=AutoencoderConfig(
        ch=32, ch_mult=(1,), num_res_blocks=1, resolution=16, z_channels=4, embed_dim=4
    ),
    unet=UNetConfig(
        in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
        attention_resolutions=(1,), num_heads=1, use_spatial_transformer=True, context_dim=16,
        legacy=False,
    ),
    cond_stage=CondStageSpec(
        "clip",
        CLIPTextConfig(vocab_size=49408, max_length=8, width=16, num_layers=1, num_heads=1,
                       mlp_dim=32),
    ),
)


def micro_config():
    config = load_config(str(ROOT / "configs" / "ldm_tiny.py"))
    config.model.spec = spec_to_dict(MICRO_SPEC)
    config.data.image_size = 16
    config.train.update(dict(num_steps=3, log_every=1, checkpoint_every=2, sample_every=3,
                             progress_bar=False))
    config.sample.update(dict(num_images=2, steps=2))
    return config


@pytest.mark.slow  # ~60-100 s of CPU: compiling the sharded LDM step and the sampler
def test_ldm_task_trains_checkpoints_and_samples(tmp_path):
    config = micro_config()
    task = tasks.make_task(config)
    result = loop.run(config, tmp_path, task)
    assert result.step == 3 and int(result.state.step) == 3
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert sorted(records) == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records.values())
    assert np.isclose(records[3]["scale_factor"], MICRO_SPEC.diffusion.scale_factor)
    # the UNet's big kernels are sharded over the 8-way fsdp axis
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    assert checkpoints.all_steps() == [2, 3]
    target = tasks.make_task(config).init_state(jax.random.key(5))
    state, data_state, _ = checkpoints.restore(3, target)
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(state.params["unet"])}
    assert any("fsdp" in str(spec) for spec in specs)
    assert int(state.step) == 3 and "loader" in data_state  # grain iterator state is saved
    grid = tmp_path / "samples" / "samples_00000003.png"
    assert grid.is_file()
