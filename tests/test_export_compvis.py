"""CompVis export: one .safetensors file that diffusers' from_single_file reads back exactly."""

import json

import diffusers
import numpy as np
import pytest
import safetensors
import torch
from support.tiny_specs import SD1_LIKE, random_params

from ldm_jax.atomic import DestinationExistsError
from ldm_jax.checkpoints import LatentDiffusionCheckpoint, save_checkpoint
from ldm_jax.checkpoints.compvis.export import SPEC_METADATA_KEY
from ldm_jax.spec import spec_from_dict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compvis")
    checkpoint = LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE))
    save_checkpoint(checkpoint, folder / "sd.safetensors", format="compvis")
    save_checkpoint(checkpoint, folder / "sd", format="diffusers")
    return folder


def test_file_uses_compvis_names_and_carries_its_spec(exported):
    with safetensors.safe_open(str(exported / "sd.safetensors"), "np") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.conv_in.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert spec_from_dict(json.loads(metadata[SPEC_METADATA_KEY])) == SD1_LIKE


def test_diffusers_from_single_file_reads_it_exactly(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    single = diffusers.StableDiffusionPipeline.from_single_file(
        str(exported / "sd.safetensors"),
        config=str(exported / "sd"),  # the tiny architecture; real SD files need no config
        safety_checker=None,
        local_files_only=True,
    )
    folder = diffusers.StableDiffusionPipeline.from_pretrained(exported / "sd", safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        theirs, ours = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert theirs.keys() == ours.keys(), name
        for key, value in ours.items():
            assert torch.equal(theirs[key], value), f"{name}.{key}"


def test_only_safetensors_is_written(tmp_path):
    checkpoint = LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE))
    with pytest.raises(ValueError, match=r"single \.safetensors file"):
        save_checkpoint(checkpoint, tmp_path / "sd.ckpt", format="compvis")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "sd.safetensors"
    target.write_bytes(b"precious")
    checkpoint = LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE))
    with pytest.raises(DestinationExistsError):
        save_checkpoint(checkpoint, target, format="compvis")
    assert target.read_bytes() == b"precious"
    save_checkpoint(checkpoint, target, format="compvis", overwrite=True)
    with safetensors.safe_open(str(target), "np") as f:
        np.testing.assert_array_equal(
            f.get_tensor("model.diffusion_model.out.2.bias"),
            checkpoint.params["unet"]["out_conv"]["bias"],
        )
    assert [p.name for p in tmp_path.iterdir()] == ["sd.safetensors"]


def test_unknown_format_is_refused(tmp_path):
    checkpoint = LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE))
    with pytest.raises(ValueError, match="allowed: .*diffusers.*compvis.*orbax"):
        save_checkpoint(checkpoint, tmp_path / "x", format="onnx")
