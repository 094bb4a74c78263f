"""SDXL checkpoints through diffusers folders and orbax: read a tiny diffusers SDXL base and
refiner folder, write them back so that diffusers reads the very same tensors, keep both
tokenizers and the pipeline options."""

import json

import diffusers
import jax
import numpy as np
import pytest
from references.torch_reference import state_dict_numpy
from support.tiny_pipelines import sdxl_pipeline, sdxl_refiner_pipeline
from support.tiny_specs import TINY_SDXL

from ldm_jax.checkpoints import load_checkpoint, save_checkpoint
from ldm_jax.checkpoints.errors import ArchitectureError, UnsupportedExportError
from ldm_jax.spec import SDXL_REFINER_TIME_IDS
from ldm_jax.tokenizers import SDXLTokenizers

PROMPTS = ["a red cube on a blue sphere!", "two cats"]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "base"
    sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_ckpt(base_folder):
    return load_checkpoint(base_folder)


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "refiner"
    sdxl_refiner_pipeline().save_pretrained(folder)
    return folder


def _assert_same_tensors(ours, reference):
    for name in COMPONENTS:
        if getattr(reference, name) is None:
            assert getattr(ours, name) is None, name
            continue
        want = state_dict_numpy(getattr(reference, name))
        got = state_dict_numpy(getattr(ours, name))
        assert sorted(got) == sorted(want), name
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}.{key}")


def test_base_folder_reads_as_the_tiny_spec(base_ckpt):
    ckpt = base_ckpt
    spec = ckpt.spec
    assert (spec.unet, spec.first_stage, spec.cond_stage) == (
        TINY_SDXL.unet, TINY_SDXL.first_stage, TINY_SDXL.cond_stage
    )  # fmt: skip
    assert spec.diffusion.conditioning_key == "crossattn_adm"
    assert (spec.diffusion.scale_factor, spec.diffusion.steps_offset) == (0.13025, 1)
    assert isinstance(ckpt.tokenizer, SDXLTokenizers)
    assert sorted(ckpt.params["cond_stage"]) == ["encoder_0", "encoder_1"]


def test_tokenizers_give_diffusers_ids(base_folder, base_ckpt):
    ckpt = base_ckpt
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base_folder)
    ours = ckpt.tokenizer(PROMPTS[1:])
    for ids, hf in zip(ours, (pipe.tokenizer, pipe.tokenizer_2), strict=True):
        want = hf(PROMPTS[1:], padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(ids, np.asarray(want))
    assert [t.pad_token_id for t in ckpt.tokenizer.tokenizers] == [49407, 0]


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_diffusers_round_trip_is_bit_exact(which, base_folder, refiner_folder, tmp_path):
    folder = base_folder if which == "base" else refiner_folder
    cls = (
        diffusers.StableDiffusionXLPipeline
        if which == "base"
        else diffusers.StableDiffusionXLImg2ImgPipeline
    )
    ckpt = load_checkpoint(folder)
    out = save_checkpoint(ckpt, tmp_path / "out", format="diffusers")
    _assert_same_tensors(cls.from_pretrained(out), cls.from_pretrained(folder))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == cls.__name__
    want = json.loads((folder / "model_index.json").read_text())
    for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        assert index.get(key, False) == want.get(key, False), key
    again = load_checkpoint(out)
    assert again.spec.cond_stage == ckpt.spec.cond_stage
    assert again.spec.unet == ckpt.spec.unet
    jax.tree.map(np.testing.assert_array_equal, again.params, ckpt.params)


def test_refiner_spec(refiner_folder):
    ckpt = load_checkpoint(refiner_folder)
    cond = ckpt.spec.cond_stage.config
    assert cond.time_ids == SDXL_REFINER_TIME_IDS
    assert len(cond.text_encoders) == 1 and cond.text_encoders[0].projection_dim == 16
    assert cond.force_zeros_for_empty_prompt is False
    assert sorted(ckpt.params["cond_stage"]) == ["encoder_0"]
    assert [t.pad_token_id for t in ckpt.tokenizer.tokenizers] == [0]


def test_orbax_round_trip(base_ckpt, tmp_path):
    ckpt = base_ckpt
    out = save_checkpoint(ckpt, tmp_path / "orbax", format="orbax")
    assert (out / "tokenizer" / "tokenizer_2" / "vocab.json").is_file()
    again = load_checkpoint(out)
    assert again.spec == ckpt.spec
    jax.tree.map(np.testing.assert_array_equal, again.params, ckpt.params)
    for ids, want in zip(again.tokenizer(PROMPTS), ckpt.tokenizer(PROMPTS), strict=True):
        np.testing.assert_array_equal(ids, want)


def test_bad_folders_fail_clearly(base_folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(base_folder, bad)
    config = json.loads((bad / "text_encoder_2" / "config.json").read_text())
    config["architectures"] = ["CLIPTextModel"]
    (bad / "text_encoder_2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureError, match="CLIPTextModelWithProjection"):
        load_checkpoint(bad)
    index = json.loads((base_folder / "model_index.json").read_text())
    index["requires_aesthetics_score"] = True  # refiner ids: y would be 8 numbers too narrow
    (bad / "model_index.json").write_text(json.dumps(index))
    shutil.copy(base_folder / "text_encoder_2" / "config.json", bad / "text_encoder_2")
    with pytest.raises(ArchitectureError, match="adm_in_channels"):
        load_checkpoint(bad)


def test_export_refuses_unusual_time_ids(base_ckpt, tmp_path):
    import dataclasses

    ckpt = base_ckpt
    cond = dataclasses.replace(ckpt.spec.cond_stage.config, time_ids=("original_size",))
    unet = dataclasses.replace(ckpt.spec.unet, adm_in_channels=cond.adm_dim)
    spec = dataclasses.replace(
        ckpt.spec, unet=unet, cond_stage=dataclasses.replace(ckpt.spec.cond_stage, config=cond)
    )
    ckpt = dataclasses.replace(ckpt, spec=spec)
    with pytest.raises(UnsupportedExportError, match="time ids"):
        save_checkpoint(ckpt, tmp_path / "x", format="diffusers")
    assert not (tmp_path / "x").exists()


def test_export_refuses_encoders_diffusers_would_run_differently(base_ckpt, tmp_path):
    import dataclasses

    ckpt = base_ckpt
    cond = ckpt.spec.cond_stage.config

    def with_first_encoder(**changes):
        first = dataclasses.replace(cond.text_encoders[0], **changes)
        config = dataclasses.replace(cond, text_encoders=(first, *cond.text_encoders[1:]))
        stage = dataclasses.replace(ckpt.spec.cond_stage, config=config)
        return dataclasses.replace(ckpt, spec=dataclasses.replace(ckpt.spec, cond_stage=stage))

    with pytest.raises(ValueError, match="bidirectional"):
        save_checkpoint(with_first_encoder(causal=False), tmp_path / "a", format="diffusers")
    with pytest.raises(UnsupportedExportError, match="hidden_states"):
        save_checkpoint(with_first_encoder(skip_last_layers=0), tmp_path / "b", format="diffusers")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
