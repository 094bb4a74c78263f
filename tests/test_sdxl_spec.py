"""SDXL's model description: the "sdxl" cond stage + conditioning_key "crossattn_adm" in specs
(JSON, validation, factory), and the one conditioning function against diffusers' SDXL pipeline."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from references.torch_reference import nchw, nhwc, state_dict_numpy
from support.tiny_pipelines import sdxl_pipeline
from support.tiny_specs import SD1_LIKE, TINY_SDXL, TINY_SDXL_CONDITIONER

from ldm_jax.checkpoints.compvis.checkpoint_table import (
    COMPVIS_IGNORABLE,
    compvis_checkpoint_table,
)
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_table
from ldm_jax.checkpoints.transformers_clip import clip_text_key_table, detect_prefix
from ldm_jax.latent_diffusion import (
    SDXLInputs,
    apply_unet,
    encode_condition,
    unet_conditioning,
)
from ldm_jax.models.factory import abstract_checkpoint_params, network_modules
from ldm_jax.models.params import count_params
from ldm_jax.models.text_time import time_ids
from ldm_jax.presets.sdxl import SDXL_PRESETS
from ldm_jax.sampling.tasks import model_task
from ldm_jax.spec import (
    SDXL_REFINER_TIME_IDS,
    CondStageSpec,
    DiffusionSpec,
    SDXLConditionerConfig,
    spec_from_dict,
    spec_to_dict,
    validate_spec,
)
from ldm_jax.tokenizers import SDXLTokenizers


@pytest.mark.parametrize("spec", [TINY_SDXL, *SDXL_PRESETS.values()], ids=["tiny", "base", "ref"])
def test_spec_json_round_trip(spec):
    text = json.dumps(spec_to_dict(spec))
    assert spec_from_dict(json.loads(text)) == spec
    validate_spec(spec)


def test_old_spec_json_still_loads():
    data = spec_to_dict(SD1_LIKE)
    assert "conditioning_key" in data["diffusion"]
    assert spec_from_dict(json.loads(json.dumps(data))) == SD1_LIKE


def test_preset_parameter_counts():
    counts = {
        name: {k: count_params(v) for k, v in abstract_checkpoint_params(spec).items()}
        for name, spec in SDXL_PRESETS.items()
    }
    # UNet / VAE / bigG / CLIP-L text as diffusers and transformers count them (sdxl-nets)
    assert counts["sdxl-base"] == {
        "unet": 2_567_463_684,
        "first_stage": 83_653_863,
        "cond_stage": 123_060_480 + 694_659_840,
    }
    assert counts["sdxl-refiner"]["cond_stage"] == 694_659_840
    assert counts["sdxl-refiner"]["unet"] == 2_259_526_660


def _replace_cond(spec, **changes):
    cond = dataclasses.replace(spec.cond_stage.config, **changes)
    return dataclasses.replace(spec, cond_stage=CondStageSpec("sdxl", cond))


def test_validation_errors_name_what_is_wrong():
    encoders = TINY_SDXL_CONDITIONER.text_encoders
    with pytest.raises(ValueError, match="needs projection_dim"):
        SDXLConditionerConfig(text_encoders=encoders[:1])
    with pytest.raises(ValueError, match="1 or 2 CLIPTextConfigs"):
        SDXLConditionerConfig(text_encoders=encoders * 2)
    with pytest.raises(ValueError, match="time_ids"):
        SDXLConditionerConfig(text_encoders=encoders, time_ids=("target_size", "original_size"))
    with pytest.raises(ValueError, match="time_ids"):
        SDXLConditionerConfig(text_encoders=encoders, time_ids=("size",))
    with pytest.raises(ValueError, match="go together"):
        CondStageSpec("clip", TINY_SDXL_CONDITIONER)
    with pytest.raises(ValueError, match="go together"):
        CondStageSpec("sdxl", encoders[0])
    with pytest.raises(ValueError, match="crossattn_adm"):  # sdxl cond with a crossattn key
        dataclasses.replace(TINY_SDXL, diffusion=DiffusionSpec())
    with pytest.raises(ValueError, match="crossattn_adm"):  # the key without the cond stage
        dataclasses.replace(SD1_LIKE, diffusion=DiffusionSpec(conditioning_key="crossattn_adm"))
    with pytest.raises(ValueError, match="adm_in_channels"):  # refiner ids, base UNet
        _replace_cond(TINY_SDXL, time_ids=SDXL_REFINER_TIME_IDS)
    data = spec_to_dict(TINY_SDXL)
    data["cond_stage"]["config"]["time_embed_dim"] = "8"
    with pytest.raises(ValueError, match="time_embed_dim"):
        spec_from_dict(data)
    data = spec_to_dict(TINY_SDXL)
    data["cond_stage"]["config"]["text_encoders"][1]["width"] = 0
    with pytest.raises(ValueError, match="width"):
        spec_from_dict(data)


def test_model_task_samples_sdxl_as_text_to_image():  # tests/test_pipeline_sdxl.py samples it
    task = model_task(TINY_SDXL)
    assert (task.name, task.conditioning, task.takes_init_image) == ("text-to-image", "text", True)


def _our_params(pipe) -> dict:
    abstract = abstract_checkpoint_params(TINY_SDXL)
    encoders = {}
    models = (pipe.text_encoder, pipe.text_encoder_2)
    for i, (cfg, model) in enumerate(zip(TINY_SDXL_CONDITIONER.text_encoders, models, strict=True)):
        sd = state_dict_numpy(model)
        table = clip_text_key_table(cfg, detect_prefix(sd))
        encoders[f"encoder_{i}"] = table.to_flax(sd, abstract["cond_stage"][f"encoder_{i}"])
    unet = diffusers_unet_table(TINY_SDXL.unet).to_flax(
        state_dict_numpy(pipe.unet), abstract["unet"]
    )
    return {"cond_stage": encoders, "unet": unet}


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_conditioning_and_unet_match_diffusers_sdxl(parity, clip_skip):
    pipe = sdxl_pipeline()
    prompts = ["a red cube on a blue sphere", "two cats"]
    sizes = dict(original_size=(96, 80), crops_coords_top_left=(4, 2), target_size=(64, 64))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=False, clip_skip=clip_skip
        )
        projection = pipe.text_encoder_2.config.projection_dim
        ref_ids = pipe._get_add_time_ids(
            sizes["original_size"], sizes["crops_coords_top_left"], sizes["target_size"],
            dtype=torch.float32, text_encoder_projection_dim=projection,
        ).repeat(2, 1)  # fmt: skip
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([999, 17])
        ref_eps = pipe.unet(
            x, t, encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ref_ids},
        ).sample  # fmt: skip
        add = pipe.unet.add_time_proj(ref_ids.flatten()).reshape(2, -1)
        ref_y = torch.cat([pooled, add], dim=-1)

    modules = network_modules(TINY_SDXL)
    params = _our_params(pipe)
    tokens = SDXLTokenizers.from_packaged_vocab()(prompts)
    ids_BN = time_ids(sizes["original_size"], sizes["crops_coords_top_left"],
                      target_size=sizes["target_size"])  # fmt: skip
    np.testing.assert_array_equal(np.broadcast_to(ids_BN, (2, 6)), ref_ids.numpy())
    inputs = SDXLInputs(tokens, np.broadcast_to(ids_BN, (2, 6)))
    encode = jax.jit(lambda p, inp: encode_condition(
        TINY_SDXL.cond_stage, modules["cond_stage"][0], p, inp, clip_skip=clip_skip
    ))  # fmt: skip
    context, y = encode(params["cond_stage"], inputs)
    skip = "" if clip_skip is None else f", clip_skip {clip_skip}"
    parity(f"SDXL context [B,77,80] vs encode_prompt{skip}", context, embeds.numpy())
    parity(f"SDXL y (pooled + time ids){skip}", y, ref_y.numpy())
    c = unet_conditioning("crossattn_adm", encoded=(context, y))
    eps = apply_unet(modules["unet"][0], params["unet"], nhwc(x), np.asarray(t), c)
    parity(f"SDXL eps (our conditioning + UNet){skip}", eps, nhwc(ref_eps))
    assert nchw(np.asarray(eps)).shape == x.shape


def test_sgm_tables_list_their_non_parameters():
    for spec in SDXL_PRESETS.values():
        accepted = compvis_checkpoint_table(spec).ignorable
        assert {k for k in accepted if not k.startswith("model_ema.")} <= COMPVIS_IGNORABLE
    assert "denoiser.sigmas" in COMPVIS_IGNORABLE
