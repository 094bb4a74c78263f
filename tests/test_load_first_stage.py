"""Standalone first-stage checkpoints (the LDM zoo's first_stage_models/*/model.ckpt): they carry
the training loss's keys besides the autoencoder's."""

import numpy as np
import pytest
from support.checkpoint_files import assert_same_params, write_state_dict
from support.tiny_specs import random_params

from ldm_jax.checkpoints import load_checkpoint
from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.spec import ModelSpec

FIRST_STAGES = {
    "kl": AutoencoderConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, attn_resolutions=(128,)
    ),
    "vq-noattn": VQConfig(
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        z_channels=3,
        embed_dim=3,
        n_embed=16,
        mid_attention=False,
    ),
}


@pytest.mark.parametrize("name", FIRST_STAGES)
def test_standalone_first_stage_with_training_loss(tmp_path, name):
    spec = ModelSpec(first_stage=FIRST_STAGES[name])
    params = random_params(spec)
    loss = {"loss.logvar": np.zeros((), np.float32), "loss.discriminator.main.0.weight": np.ones(3)}
    state_dict = compvis_checkpoint_table(spec).to_torch(params) | loss
    loaded = load_checkpoint(write_state_dict(tmp_path / "model.ckpt", state_dict))
    assert loaded.spec == spec and loaded.tokenizer is None
    assert_same_params(loaded.params, params)
