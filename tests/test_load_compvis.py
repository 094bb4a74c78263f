"""Loading CompVis single files (.safetensors and .ckpt): detection from keys, the yaml config,
EMA weights, standalone first stages, and the errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import yaml
from diffusers.loaders import single_file_utils as diffusers_single_file
from support.checkpoint_files import assert_same_params, write_state_dict
from support.compvis_family_specs import CLASS_LDM, SD1, SD2, VAE, compvis_state_dict
from support.tiny_specs import UNCONDITIONAL_VQ, random_params

from ldm_jax.checkpoints import load_checkpoint
from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table
from ldm_jax.checkpoints.diffusers.autoencoder import autoencoder_kl_table, diffusers_config
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config, diffusers_unet_table
from ldm_jax.checkpoints.errors import (
    ArchitectureError,
    CheckpointFileError,
    CheckpointMismatchError,
)
from ldm_jax.checkpoints.transformers_clip import clip_text_to_torch
from ldm_jax.spec import DiffusionSpec, ModelSpec
from ldm_jax.tokenizers import CLIPTokenizer


def _write_yaml(path, spec_yaml):
    path.write_text(yaml.safe_dump(spec_yaml))
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_is_detected_from_keys_and_loads_exactly(tmp_path, suffix):
    params = random_params(SD1)
    position_ids = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77)[None]
    }
    path = write_state_dict(
        tmp_path / f"sd1{suffix}", compvis_state_dict(SD1, params, extra=position_ids)
    )
    checkpoint = load_checkpoint(path)
    assert checkpoint.spec == SD1
    assert_same_params(checkpoint.params, params)
    assert isinstance(checkpoint.tokenizer, CLIPTokenizer)
    assert checkpoint.tokenizer.pad_token_id == checkpoint.tokenizer.eos_token_id  # SD 1.x pads EOS
    bf16 = load_checkpoint(path, dtype=jnp.bfloat16).params
    assert_same_params(bf16, jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params))


def test_the_file_is_what_diffusers_converters_read(tmp_path):
    """Independent check of the layout loaded above: diffusers' own CompVis -> diffusers
    converters turn the file into exactly the state dicts our diffusers tables give."""
    params = random_params(SD1)
    path = write_state_dict(tmp_path / "sd1.safetensors", compvis_state_dict(SD1, params))
    file = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(str(path)).items()}
    loaded = load_checkpoint(path).params
    _, unet_kwargs = diffusers_unet_config(SD1.unet)
    checks = [
        (
            diffusers_single_file.convert_ldm_unet_checkpoint(file, unet_kwargs),
            diffusers_unet_table(SD1.unet).to_torch(loaded["unet"]),
        ),
        (
            diffusers_single_file.convert_ldm_vae_checkpoint(file, diffusers_config(VAE)),
            autoencoder_kl_table(VAE).to_torch(loaded["first_stage"]),
        ),
        (
            diffusers_single_file.convert_ldm_clip_checkpoint(file),
            clip_text_to_torch(loaded["cond_stage"], SD1.cond_stage.config, prefix="text_model."),
        ),
    ]
    for theirs, ours in checks:
        assert sorted(theirs) == sorted(ours)
        for key, value in ours.items():
            np.testing.assert_array_equal(theirs[key].numpy().reshape(value.shape), value)


def test_sd2_needs_a_prediction_hint_or_says_it_assumes_epsilon(tmp_path):
    params = random_params(SD2)
    path = write_state_dict(tmp_path / "v2-1_768.safetensors", compvis_state_dict(SD2, params))
    with pytest.warns(UserWarning, match="Stable Diffusion 2.x.*Assuming epsilon"):
        base = load_checkpoint(path)
    assert base.spec == SD2
    assert base.tokenizer.pad_token_id == 0  # OpenCLIP pads with zeros
    v = load_checkpoint(path, prediction_type="v_prediction")
    assert v.spec.diffusion.prediction_type == "v_prediction"
    assert v.spec.diffusion.latent_size == 96 and v.spec.unet.upcast_attention
    assert_same_params(v.params, params)


def test_sd_inpainting_has_nine_input_channels_and_hybrid_conditioning(tmp_path):
    spec = dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, in_channels=9))
    scale = {"scale_factor": np.array(0.25, np.float32)}  # a scale_by_std buffer
    state_dict = compvis_state_dict(spec, random_params(spec), extra=scale)
    loaded = load_checkpoint(write_state_dict(tmp_path / "inpaint.ckpt", state_dict))
    assert loaded.spec.unet.in_channels == 9
    assert loaded.spec.diffusion.conditioning_key == "hybrid"
    assert loaded.spec.diffusion.concat_input == "mask_and_masked_image"
    assert loaded.spec.diffusion.scale_factor == 0.25


def _sd2_v_yaml(num_res_blocks=1):
    unet = SD2.unet
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "parameterization": "v",
                "linear_start": 0.00085,
                "linear_end": 0.012,
                "timesteps": 1000,
                "image_size": 96,
                "conditioning_key": "crossattn",
                "scale_factor": 0.18215,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "use_checkpoint": True,
                        "use_fp16": True,
                        "image_size": 32,
                        "in_channels": 4,
                        "out_channels": 4,
                        "model_channels": unet.model_channels,
                        "attention_resolutions": list(unet.attention_resolutions),
                        "num_res_blocks": num_res_blocks,
                        "channel_mult": list(unet.channel_mult),
                        "num_head_channels": 64,
                        "use_spatial_transformer": True,
                        "use_linear_in_transformer": True,
                        "transformer_depth": 1,
                        "context_dim": 64,
                        "legacy": False,
                    },
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": 4,
                        "monitor": "val/rec_loss",
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": 4,
                            "resolution": 256,
                            "in_channels": 3,
                            "out_ch": 3,
                            "ch": 32,
                            "ch_mult": [1, 2],
                            "num_res_blocks": 1,
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                    "params": {"freeze": True, "layer": "penultimate"},
                },
            },
        }
    }


def test_yaml_config_settles_v_prediction(tmp_path):
    params = random_params(SD2)
    path = write_state_dict(tmp_path / "v.ckpt", compvis_state_dict(SD2, params))
    config = _write_yaml(tmp_path / "v2-inference-v.yaml", _sd2_v_yaml())
    loaded = load_checkpoint(path, config=config)
    expected = dataclasses.replace(
        SD2,
        unet=dataclasses.replace(SD2.unet, upcast_attention=True),
        diffusion=DiffusionSpec(prediction_type="v_prediction", latent_size=96),
    )
    assert loaded.spec == expected
    assert_same_params(loaded.params, params)


def test_checkpoint_that_does_not_fit_the_yaml_lists_the_keys(tmp_path):
    path = write_state_dict(tmp_path / "v.safetensors", compvis_state_dict(SD2, random_params(SD2)))
    config = _write_yaml(tmp_path / "wrong.yaml", _sd2_v_yaml(num_res_blocks=2))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"v.safetensors does not fit the architecture of the yaml config: .*missing keys: "
        r"model\.diffusion_model\.input_blocks\.",
    ):
        load_checkpoint(path, config=config)
    config.write_text("model: [unclosed")
    with pytest.raises(ArchitectureError, match="wrong.yaml is not valid YAML"):
        load_checkpoint(path, config=config)
    with pytest.raises(CheckpointFileError, match="is a config, not weights; pass it as config="):
        load_checkpoint(config)


CLASS_YAML = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015,
            "linear_end": 0.0195,
            "image_size": 8,
            "cond_stage_trainable": True,
            "conditioning_key": "crossattn",
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 8,
                    "in_channels": 3,
                    "out_channels": 3,
                    "model_channels": 32,
                    "attention_resolutions": [2, 1],
                    "num_res_blocks": 1,
                    "channel_mult": [1, 2],
                    "num_heads": 1,
                    "use_spatial_transformer": True,
                    "transformer_depth": 1,
                    "context_dim": 16,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.VQModelInterface",
                "params": {
                    "embed_dim": 3,
                    "n_embed": 16,
                    "ddconfig": {
                        "double_z": False,
                        "z_channels": 3,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 32,
                        "ch_mult": [1, 2],
                        "num_res_blocks": 1,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                },
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"n_classes": 11, "embed_dim": 16, "key": "class_label", "ucg_rate": 0.1},
            },
        },
    }
}


def test_ldm_zoo_model_needs_its_yaml(tmp_path):
    params = random_params(CLASS_LDM)
    path = write_state_dict(tmp_path / "model.ckpt", compvis_state_dict(CLASS_LDM, params))
    with pytest.raises(ArchitectureError, match="model.ckpt: .*pass the model's original yaml"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, config=CLASS_YAML)  # a parsed mapping works too
    assert loaded.spec == CLASS_LDM and loaded.tokenizer is None
    assert_same_params(loaded.params, params)
    bad = yaml.safe_load(yaml.safe_dump(CLASS_YAML))
    bad["model"]["params"]["unet_config"]["params"]["use_new_attention_order"] = True
    with pytest.raises(ArchitectureError, match="use_new_attention_order=True is not supported"):
        load_checkpoint(path, config=bad)


def test_ldm_inpainting_yaml_concat_with_first_stage_conditioning(tmp_path):
    """models/ldm/inpainting_big/config.yaml at toy size: concat_mode, `__is_first_stage__`
    (a second first-stage copy saved under cond_stage_model.), attn_type none, resblock_updown."""
    spec = ModelSpec(
        first_stage=dataclasses.replace(CLASS_LDM.first_stage, mid_attention=False),
        unet=dataclasses.replace(
            UNCONDITIONAL_VQ.unet,
            in_channels=7,
            num_heads=2,
            num_head_channels=-1,
            resblock_updown=True,
        ),
        diffusion=DiffusionSpec(
            linear_start=0.0015,
            linear_end=0.0205,
            scale_factor=1.0,
            conditioning_key="concat",
            latent_size=8,
            concat_input="masked_image_and_mask",
        ),
    )
    params = random_params(spec)
    state_dict = compvis_checkpoint_table(spec).to_torch(params)
    state_dict |= {
        "cond_stage_model." + k[len("first_stage_model.") :]: v
        for k, v in state_dict.items()
        if k.startswith("first_stage_model.")
    }
    config = yaml.safe_load(yaml.safe_dump(CLASS_YAML))
    model = config["model"]["params"]
    for name in ("conditioning_key", "cond_stage_trainable"):
        del model[name]
    model.update(linear_end=0.0205, concat_mode=True, cond_stage_config="__is_first_stage__")
    model["unet_config"]["params"].update(
        in_channels=7, attention_resolutions=[2], num_heads=2, resblock_updown=True
    )
    for name in ("use_spatial_transformer", "transformer_depth", "context_dim"):
        del model["unet_config"]["params"][name]
    model["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "none"
    loaded = load_checkpoint(
        write_state_dict(tmp_path / "inpaint.safetensors", state_dict), config=config
    )
    assert loaded.spec == spec
    assert_same_params(loaded.params, params)


def test_ema_weights_on_request(tmp_path):
    params, ema = random_params(SD1, seed=0), random_params(SD1, seed=1)
    path = write_state_dict(tmp_path / "full.ckpt", compvis_state_dict(SD1, params, ema=ema))
    assert_same_params(load_checkpoint(path).params, params)
    with_ema = load_checkpoint(path, use_ema=True).params
    assert_same_params(with_ema["unet"], ema["unet"])
    assert_same_params(with_ema["first_stage"], params["first_stage"])
    pruned = write_state_dict(tmp_path / "pruned.safetensors", compvis_state_dict(SD1, params))
    with pytest.raises(CheckpointMismatchError, match="pruned.safetensors has no EMA weights"):
        load_checkpoint(pruned, use_ema=True)


def test_bad_files_are_one_clear_error(tmp_path):
    path = write_state_dict(
        tmp_path / "sd1.safetensors", compvis_state_dict(SD1, random_params(SD1))
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointFileError, match="sd1.safetensors is not a readable"):
        load_checkpoint(path)
    other = tmp_path / "weights.npz"
    other.write_bytes(data)
    with pytest.raises(CheckpointFileError, match=r"unknown checkpoint file type '\.npz'"):
        load_checkpoint(other)
    foreign = write_state_dict(
        tmp_path / "resnet.safetensors", {"fc.weight": np.ones((2, 2), np.float32)}
    )
    with pytest.raises(ArchitectureError, match="not a CompVis latent-diffusion or first-stage"):
        load_checkpoint(foreign)
    unexpected = compvis_state_dict(SD1, random_params(SD1)) | {"model.extra": np.ones(1)}
    with pytest.raises(CheckpointMismatchError, match="detected from its keys.*model.extra"):
        load_checkpoint(write_state_dict(tmp_path / "extra.safetensors", unexpected))
