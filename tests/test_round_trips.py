"""Format round trips through ldm_jax are bit-exact: diffusers -> ours -> diffusers, CompVis ->
ours -> CompVis (from .safetensors and .ckpt), and CompVis -> ours -> orbax -> ours."""

import json

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers
from support.tiny_pipelines import sd_pipeline
from support.tiny_specs import SD1_LIKE, random_params

from ldm_jax.checkpoints import load_checkpoint, save_checkpoint
from ldm_jax.checkpoints.compvis.checkpoint_table import (
    COMPVIS_IGNORABLE,
    compvis_checkpoint_table,
    ema_key,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _tensors(path) -> dict[str, np.ndarray]:
    with safetensors.safe_open(str(path), "pt") as f:  # "pt": bf16 and all dtypes bit-exact
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_diffusers_to_ours_to_diffusers_is_bit_exact(tmp_path):
    sd_pipeline().save_pretrained(tmp_path / "source")
    checkpoint = load_checkpoint(tmp_path / "source")
    save_checkpoint(checkpoint, tmp_path / "again", format="diffusers")
    for component in ("unet", "vae"):
        _assert_same_tensors(
            _tensors(tmp_path / "source" / component / WEIGHTS),
            _tensors(tmp_path / "again" / component / WEIGHTS),
        )
    # transformers writes this folder with or without the "text_model." key prefix depending on
    # its version; compare the loaded models, which is what the prefix choice cannot change.
    source, again = (
        transformers.CLIPTextModel.from_pretrained(tmp_path / name / "text_encoder").state_dict()
        for name in ("source", "again")
    )
    _assert_same_tensors(source, again)
    assert checkpoint.spec.diffusion.prediction_type == "v_prediction"
    source, again = (
        json.loads((tmp_path / name / "scheduler" / "scheduler_config.json").read_text())
        for name in ("source", "again")
    )
    settings = ("timestep_spacing", "steps_offset", "set_alpha_to_one")  # written back as read
    assert [source[k] for k in settings] == [again[k] for k in settings] == ["leading", 1, True]
    reloaded = load_checkpoint(tmp_path / "again")
    assert reloaded.spec == checkpoint.spec
    ids = reloaded.tokenizer(["a photo of a cat"])
    np.testing.assert_array_equal(ids, checkpoint.tokenizer(["a photo of a cat"]))


def _compvis_source(ema=False):
    params = random_params(SD1_LIKE, seed=1)
    state_dict = compvis_checkpoint_table(SD1_LIKE).to_torch(params)
    # what a training run's file also holds: schedule buffers (and, unpruned, EMA weights)
    state_dict["betas"] = np.linspace(1e-4, 2e-2, 1000, dtype=np.float32)
    state_dict["alphas_cumprod"] = np.cumprod(1 - state_dict["betas"])
    if ema:
        for key, value in list(state_dict.items()):
            if key.startswith("model.diffusion_model."):
                state_dict[ema_key(key)] = value + 1.0
    return state_dict


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_compvis_to_ours_to_compvis_is_bit_exact(tmp_path, suffix):
    source = _compvis_source()
    path = tmp_path / f"sd{suffix}"
    if suffix == ".safetensors":
        safetensors.numpy.save_file(source, str(path))
    else:
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in source.items()}}, path)
    checkpoint = load_checkpoint(path, config=None)
    save_checkpoint(checkpoint, tmp_path / "again.safetensors", format="compvis")
    exported = _tensors(tmp_path / "again.safetensors")
    parameters = {k: torch.from_numpy(v) for k, v in source.items() if k not in COMPVIS_IGNORABLE}
    _assert_same_tensors(exported, parameters)
    assert "betas" in COMPVIS_IGNORABLE  # named once as a non-parameter, and not re-exported


def test_ema_weights_are_what_gets_exported(tmp_path):
    source = _compvis_source(ema=True)
    safetensors.numpy.save_file(source, str(tmp_path / "full.safetensors"))
    checkpoint = load_checkpoint(tmp_path / "full.safetensors", use_ema=True)
    save_checkpoint(checkpoint, tmp_path / "ema.safetensors", format="compvis")
    exported = _tensors(tmp_path / "ema.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    np.testing.assert_array_equal(exported[key].numpy(), source[ema_key(key)])
    assert not any(k.startswith("model_ema.") for k in exported)


def test_orbax_round_trip_of_a_loaded_checkpoint(tmp_path):
    safetensors.numpy.save_file(_compvis_source(), str(tmp_path / "sd.safetensors"))
    checkpoint = load_checkpoint(tmp_path / "sd.safetensors")
    checkpoint.save_pretrained(tmp_path / "orbax", format="orbax")
    restored = type(checkpoint).from_pretrained(tmp_path / "orbax")
    assert restored.spec == checkpoint.spec
    for a, b in zip(
        jax.tree.leaves(restored.params), jax.tree.leaves(checkpoint.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = restored.tokenizer(["an orbax tokenizer"])
    np.testing.assert_array_equal(ids, checkpoint.tokenizer(["an orbax tokenizer"]))
