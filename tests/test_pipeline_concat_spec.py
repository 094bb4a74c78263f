"""DiffusionSpec.concat_input as the loaders set it (CompVis yaml, diffusers folders, exports)."""

import copy
import dataclasses
import json

import pytest
from support.tiny_pipelines import ldm_super_resolution_pipeline
from support.tiny_specs import SD1_LIKE, random_params

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.checkpoints.compvis.yaml_config import spec_from_yaml
from ldm_jax.sampling.tasks import model_task
from ldm_jax.spec import DiffusionSpec

VQ_F2 = {
    "target": "ldm.models.autoencoder.VQModelInterface",
    "params": {
        "embed_dim": 3,
        "n_embed": 16,
        "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
}  # fmt: skip
BSR_YAML = {  # models/ldm/bsr_sr/config.yaml at toy size
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015,
            "linear_end": 0.0155,
            "image_size": 8,
            "concat_mode": True,
            "cond_stage_trainable": False,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "in_channels": 6, "out_channels": 3, "model_channels": 32,
                    "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
                    "num_head_channels": 16,
                },
            },  # fmt: skip
            "first_stage_config": VQ_F2,
            "cond_stage_config": {"target": "torch.nn.Identity"},
        },
    }
}


def test_yaml_concat_inputs():
    bsr = spec_from_yaml(BSR_YAML).spec
    assert bsr.cond_stage is None and bsr.diffusion.conditioning_key == "concat"
    assert bsr.diffusion.concat_input == "low_res_image"
    assert model_task(bsr).name == "super-resolution"
    inpaint = copy.deepcopy(BSR_YAML)
    inpaint["model"]["params"]["cond_stage_config"] = "__is_first_stage__"
    inpaint["model"]["params"]["unet_config"]["params"]["in_channels"] = 7
    spec = spec_from_yaml(inpaint).spec
    assert spec.diffusion.concat_input == "masked_image_and_mask"
    assert model_task(spec).name == "inpainting"
    odd = copy.deepcopy(BSR_YAML)  # a concat model of no known kind: sampled by nothing
    odd["model"]["params"]["unet_config"]["params"]["in_channels"] = 5
    spec = spec_from_yaml(odd).spec
    assert spec.diffusion.concat_input is None
    with pytest.raises(NotImplementedError, match="conditioning_key 'concat', concat_input None"):
        model_task(spec)


def test_legacy_sd_inpainting_spec_is_still_inpainting():
    unet = dataclasses.replace(SD1_LIKE.unet, in_channels=9)
    legacy = dataclasses.replace(
        SD1_LIKE, unet=unet, diffusion=DiffusionSpec(conditioning_key="hybrid")
    )  # saved before concat_input existed
    assert model_task(legacy).concat == "mask_and_masked_image"


def test_diffusers_export_keeps_the_task(tmp_path):
    ldm_super_resolution_pipeline().save_pretrained(tmp_path / "sr")
    sr = LatentDiffusionCheckpoint.from_pretrained(tmp_path / "sr")
    assert sr.spec.diffusion.concat_input == "low_res_image"
    sr.save_pretrained(tmp_path / "sr-again", format="diffusers")
    index = json.loads((tmp_path / "sr-again" / "model_index.json").read_text())
    assert index["_class_name"] == "LDMSuperResolutionPipeline"
    again = LatentDiffusionCheckpoint.from_pretrained(tmp_path / "sr-again")
    assert again.spec.diffusion.concat_input == "low_res_image"

    unet = dataclasses.replace(SD1_LIKE.unet, in_channels=9)
    diffusion = DiffusionSpec(conditioning_key="hybrid", concat_input="mask_and_masked_image")
    spec = dataclasses.replace(SD1_LIKE, unet=unet, diffusion=diffusion)
    from ldm_jax.tokenizers import CLIPTokenizer  # noqa: PLC0415

    tokenizer = CLIPTokenizer.from_packaged_vocab()
    checkpoint = LatentDiffusionCheckpoint(spec, random_params(spec), tokenizer)
    checkpoint.save_pretrained(tmp_path / "inpaint", format="diffusers")
    index = json.loads((tmp_path / "inpaint" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    loaded = LatentDiffusionCheckpoint.from_pretrained(tmp_path / "inpaint")
    assert loaded.spec.diffusion.concat_input == "mask_and_masked_image"
