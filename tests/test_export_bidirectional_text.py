"""A bidirectional (causal=False) CLIP text encoder is refused by the torch-tool exports."""

import dataclasses

import pytest
from support.tiny_specs import SD1_LIKE, random_params

from ldm_jax.checkpoints import LatentDiffusionCheckpoint


@pytest.mark.parametrize("fmt", ["diffusers", "compvis"])
def test_bidirectional_text_encoder_cannot_be_exported_to_torch_tools(tmp_path, fmt):
    cond = dataclasses.replace(
        SD1_LIKE.cond_stage, config=dataclasses.replace(SD1_LIKE.cond_stage.config, causal=False)
    )
    spec = dataclasses.replace(SD1_LIKE, cond_stage=cond)
    checkpoint = LatentDiffusionCheckpoint(spec, random_params(spec))
    destination = tmp_path / "out"
    with pytest.raises(ValueError, match="causal=False.*allowed: format='orbax'"):
        checkpoint.save_pretrained(destination, format=fmt)
    assert not destination.exists()
