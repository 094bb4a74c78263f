"""SDXL as SGM single files (`model.diffusion_model.*`, `conditioner.embedders.<i>.*`,
`first_stage_model.*`): export that diffusers' `from_single_file` reads to the same tensors, and
architecture detection from keys and shapes (base and refiner), .safetensors and .ckpt."""

import dataclasses

import diffusers
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from references.torch_reference import state_dict_numpy
from support.tiny_pipelines import sgm_sdxl_pipeline

from ldm_jax.checkpoints import load_checkpoint, save_checkpoint
from ldm_jax.checkpoints.errors import ArchitectureError
from ldm_jax.latent_diffusion import SDXLInputs, apply_unet, encode_condition, unet_conditioning
from ldm_jax.models.factory import network_modules
from ldm_jax.spec import SDXL_BASE_TIME_IDS, SDXL_REFINER_TIME_IDS

CLASSES = {
    "base": diffusers.StableDiffusionXLPipeline,
    "refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
}


@pytest.fixture(scope="module", params=["base", "refiner"])
def exported(request, tmp_path_factory):
    """(variant, diffusers folder, our SGM export, the checkpoint read from the folder)."""
    root = tmp_path_factory.mktemp(f"sgm-{request.param}")
    sgm_sdxl_pipeline(refiner=request.param == "refiner").save_pretrained(root / "folder")
    ckpt = load_checkpoint(root / "folder")
    path = save_checkpoint(ckpt, root / "sdxl.safetensors", format="compvis")
    return request.param, root / "folder", path, ckpt


def _without_spec(path, destination):
    """The same tensors without ldm_jax's spec metadata: what an SGM release file holds."""
    tensors = safetensors.numpy.load_file(str(path))
    # SGM's DiscreteDenoiser buffer and bigG's contrastive scale: in release files, not params
    tensors["denoiser.sigmas"] = np.linspace(0.03, 14.6, 1000, dtype=np.float32)
    (projection,) = [k for k in tensors if k.endswith("model.text_projection")]
    tensors[projection.removesuffix("text_projection") + "logit_scale"] = np.array(4.6, np.float32)
    safetensors.numpy.save_file(tensors, str(destination), metadata={"format": "pt"})
    return tensors


def test_export_has_sgm_keys(exported):
    variant, _, path, _ = exported
    keys = set(safetensors.numpy.load_file(str(path)))
    bigg = f"conditioner.embedders.{1 if variant == 'base' else 0}.model."
    assert bigg + "text_projection" in keys
    assert bigg + "transformer.resblocks.0.attn.in_proj_weight" in keys
    assert ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys) == (
        variant == "base"
    )
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)


def test_diffusers_from_single_file_reads_the_same_tensors(exported):
    variant, folder, path, _ = exported
    cls = CLASSES[variant]
    ours = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    reference = cls.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(reference, name) is None:
            continue
        want = state_dict_numpy(getattr(reference, name))
        got = state_dict_numpy(getattr(ours, name))
        assert sorted(got) == sorted(want), name
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}.{key}")


def _eps(spec, params, tokenizer):
    """Our conditioning + UNet on fixed inputs: equal outputs = the same networks."""
    modules = network_modules(spec)
    cond = spec.cond_stage.config
    rng = np.random.default_rng(0)
    tokens = tokenizer(["a small red house by a lake"])
    ids = rng.uniform(0, 1024, (1, cond.num_time_ids)).astype(np.float32)
    encoded = encode_condition(
        spec.cond_stage, modules["cond_stage"][0], params["cond_stage"], SDXLInputs(tokens, ids)
    )
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    c = unet_conditioning("crossattn_adm", encoded=encoded)
    return np.asarray(apply_unet(modules["unet"][0], params["unet"], x, np.array([500]), c))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_detection_from_keys(exported, suffix, tmp_path):
    variant, _, path, ckpt = exported
    stripped = tmp_path / f"release{suffix}"
    tensors = _without_spec(path, tmp_path / "release.safetensors")
    if suffix == ".ckpt":  # a pickled release file, read weights-only
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}}, stripped)
    detected = load_checkpoint(stripped)
    spec = detected.spec
    cond = spec.cond_stage.config
    assert cond.time_ids == (SDXL_BASE_TIME_IDS if variant == "base" else SDXL_REFINER_TIME_IDS)
    assert cond.force_zeros_for_empty_prompt == (variant == "base")
    # eos id 2 (legacy, argmax pooling) is what SGM files mean; the tiny folder says 49407
    encoders = ckpt.spec.cond_stage.config.text_encoders
    assert cond.text_encoders == tuple(dataclasses.replace(e, eos_token_id=2) for e in encoders)
    assert spec.diffusion.scale_factor == 0.13025
    assert spec.diffusion.conditioning_key == "crossattn_adm"
    assert spec.unet.num_head_channels == 64 and spec.unet.addition_time_embed_dim == 256
    jax.tree.map(np.testing.assert_array_equal, detected.params, ckpt.params)
    pads = [t.pad_token_id for t in detected.tokenizer.tokenizers]
    assert pads == [49407, 0][-len(encoders) :]
    if suffix == ".ckpt":
        return  # the same file contents as the .safetensors case
    # the same networks (heads, depths written differently): the same outputs
    ours = _eps(spec, detected.params, detected.tokenizer)
    np.testing.assert_allclose(ours, _eps(ckpt.spec, ckpt.params, detected.tokenizer), atol=1e-6)


def test_incomplete_sgm_conditioner_fails_clearly(exported, tmp_path):
    variant, _, path, _ = exported
    tensors = safetensors.numpy.load_file(str(path))
    projection = [k for k in tensors if k.endswith("model.text_projection")]
    assert len(projection) == 1
    del tensors[projection[0]]
    bad = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file(tensors, str(bad), metadata={"format": "pt"})
    with pytest.raises(ArchitectureError, match="text_projection"):
        load_checkpoint(bad)


class _Shaped:
    def __init__(self, shape):
        self.shape = shape


@pytest.mark.parametrize("name", ["sdxl-base", "sdxl-refiner"])
def test_full_size_files_are_detected_as_the_presets(name):
    """The published SGM files' key shapes (from the exact table, no weights) give back the preset
    spec, including the depth of the levels without attention (diffusers' (1, 2, 10) / 4)."""
    from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table
    from ldm_jax.checkpoints.compvis.detect import first_stage_from_keys, sdxl_from_keys
    from ldm_jax.checkpoints.key_table import KeyMap, flatten_params
    from ldm_jax.models.factory import abstract_checkpoint_params
    from ldm_jax.presets.sdxl import sdxl_preset

    spec = sdxl_preset(name)
    abstract = flatten_params(abstract_checkpoint_params(spec))
    state = {}
    for entry in compvis_checkpoint_table(spec).entries:
        if isinstance(entry, KeyMap):
            shape = entry.transform.torch_shape(abstract[entry.flax_path].shape)
        else:  # OpenCLIP's fused in_proj: the parts stacked on the first axis
            parts = [entry.transform.torch_shape(abstract[p].shape) for p in entry.flax_paths]
            shape = (sum(part[0] for part in parts), *parts[0][1:])
        state[entry.torch_key] = _Shaped(shape)
    detected = sdxl_from_keys(state, first_stage_from_keys(state, "first_stage_model."))
    assert detected.unet == spec.unet and detected.cond_stage == spec.cond_stage
