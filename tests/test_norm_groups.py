"""diffusers models with norm_num_groups != 32 (8 here): load, match diffusers, export back.

diffusers threads `norm_num_groups` to every GroupNorm of UNet2DConditionModel (resnets,
Transformer2DModel norms, conv_norm_out) and of AutoencoderKL (resnets, attention, conv_norm_out);
CompVis' networks always use 32, so a CompVis export of such a model is refused.
"""

import dataclasses
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from references.torch_reference import nchw, nhwc, randomize_, state_dict_numpy
from support.checkpoint_files import assert_same_params
from support.tiny_pipelines import sd_components

from ldm_jax.checkpoints import load_checkpoint
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config, diffusers_unet_table
from ldm_jax.checkpoints.diffusers.unet_config import unet_config_from_diffusers
from ldm_jax.checkpoints.errors import ArchitectureError, UnsupportedExportError
from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_jax.models.params import abstract_params
from ldm_jax.models.unet import UNet, UNetConfig
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from ldm_jax.spec import spec_from_dict, spec_to_dict

GROUPS = 8
PIXEL_BAR = 2 / 255  # as tests/test_pipeline.py: max |ours - diffusers| on [0, 1] images


def _pipeline() -> diffusers.StableDiffusionPipeline:
    """The tiny SD pipeline of support/tiny_pipelines, its UNet and VAE with 8 groups."""
    components = sd_components()
    unet = diffusers.UNet2DConditionModel.from_config(
        components["unet"].config, norm_num_groups=GROUPS
    )
    vae = diffusers.AutoencoderKL.from_config(
        components["vae"].config, block_out_channels=(16, 32), norm_num_groups=GROUPS
    )
    randomize_(unet, 10)
    randomize_(vae, 11)
    components.update(unet=unet.eval(), vae=vae.eval())
    return diffusers.StableDiffusionPipeline(**components)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pipe = _pipeline()
    folder = tmp_path_factory.mktemp("groups") / "sd"
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture(scope="module")
def checkpoint(sd_folder):
    return load_checkpoint(sd_folder[0])


def _with_groups(config, groups):
    return dataclasses.replace(config, norm_num_groups=groups)


def test_networks_match_diffusers(sd_folder, checkpoint, parity):
    _, pipe = sd_folder
    spec, params = checkpoint.spec, checkpoint.params
    assert spec.unet.norm_num_groups == spec.first_stage.norm_num_groups == GROUPS
    assert spec.first_stage.ch == 16

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3, 917])
    context = rng.standard_normal((2, 7, pipe.unet.config.cross_attention_dim)).astype(np.float32)
    ours = UNet(spec.unet).apply({"params": params["unet"]}, x, t, context)
    with torch.no_grad():
        ref = nhwc(pipe.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)
    parity("norm_num_groups=8: unet", ours, ref)
    # the comparison sees the group count: 16 groups (also valid here) compute another thing
    other = UNet(_with_groups(spec.unet, 16)).apply({"params": params["unet"]}, x, t, context)
    assert np.abs(other - ref).max() > 1e-2 * np.abs(ref).max()

    vae_params = {"params": params["first_stage"]}
    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    decoded = AutoencoderKL(spec.first_stage).apply(vae_params, z, method="decode")
    image = rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    posterior = AutoencoderKL(spec.first_stage).apply(vae_params, image, method="encode")
    with torch.no_grad():
        ref_decoded = nhwc(pipe.vae.decode(nchw(z)).sample)
        ref_mean = nhwc(pipe.vae.encode(nchw(image)).latent_dist.mean)
    parity("norm_num_groups=8: vae decode", decoded, ref_decoded)
    parity("norm_num_groups=8: vae encode (mean)", posterior.mean, ref_mean)
    other_vae = AutoencoderKL(_with_groups(spec.first_stage, 16))
    other = other_vae.apply(vae_params, z, method="decode")
    assert np.abs(other - ref_decoded).max() > 1e-2 * np.abs(ref_decoded).max()


def test_unconditional_unet_with_attention_matches_diffusers(parity):
    """UNet2DModel: AttentionBlock norms, and the mid attention's attn_norm_num_groups rule."""
    unet = diffusers.UNet2DModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=GROUPS,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=GROUPS,
    )
    randomize_(unet, 3)
    diffusers_config = dict(unet.config, _class_name="UNet2DModel")
    config = unet_config_from_diffusers(diffusers_config)
    assert config.norm_num_groups == GROUPS and config.use_scale_shift_norm
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 3)).astype(np.float32)
    t = np.array([10])
    model = UNet(config)
    params = diffusers_unet_table(config).to_flax(
        state_dict_numpy(unet), abstract_params(model, x, t)
    )
    with torch.no_grad():
        ref = unet.eval()(nchw(x), torch.from_numpy(t)).sample
    parity(
        "norm_num_groups=8: unconditional unet", model.apply({"params": params}, x, t), nhwc(ref)
    )
    name, kwargs = diffusers_unet_config(config)
    assert name == "UNet2DModel"
    assert kwargs["norm_num_groups"] == kwargs["attn_norm_num_groups"] == GROUPS
    # a mid attention with other groups than the rest has no equivalent here
    with pytest.raises(ArchitectureError, match="attn_norm_num_groups=32 with norm_num_groups=8"):
        unet_config_from_diffusers(diffusers_config | {"attn_norm_num_groups": 32})


def test_export_to_diffusers_reads_back_bit_exactly(sd_folder, checkpoint, tmp_path):
    _, pipe = sd_folder
    out = tmp_path / "export"
    checkpoint.save_pretrained(out, format="diffusers")
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    vae = diffusers.AutoencoderKL.from_pretrained(out / "vae")
    assert unet.config.norm_num_groups == vae.config.norm_num_groups == GROUPS
    for exported, original in ((unet, pipe.unet), (vae, pipe.vae)):
        ours, theirs = state_dict_numpy(exported), state_dict_numpy(original)
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=key)
    assert_same_params(load_checkpoint(out).params, checkpoint.params)


def test_pipeline_samples_like_diffusers(sd_folder, parity):
    folder, _ = sd_folder
    prompts, negatives = ["a photo of a cat", "a harbour"], ["blurry", "low quality"]
    latents = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    reference_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    reference_pipe.set_progress_bar_config(disable=True)
    reference = reference_pipe(
        prompt=prompts,
        negative_prompt=negatives,
        num_inference_steps=5,
        guidance_scale=7.5,
        latents=torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))),
        output_type="np",
    ).images
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    ours = pipe(
        prompts,
        negative_prompt=negatives,
        num_inference_steps=5,
        guidance_scale=7.5,
        latents=latents,
        output_type="np",
    ).images
    assert ours.shape == reference.shape == (2, 16, 16, 3)
    parity(
        "norm_num_groups=8: pipeline DDIM, CFG 7.5, 5 steps (pixels)", ours, reference, PIXEL_BAR
    )
    assert 0.2 < np.mean((reference > 0) & (reference < 1))  # not just saturated pixels


def test_groups_must_divide_every_norm_width(sd_folder, tmp_path):
    with pytest.raises(ValueError, match=r"norm_num_groups=12 .*\[32, 64\]\); \[32, 64\] are not"):
        UNetConfig(model_channels=32, channel_mult=(1, 2), num_heads=1, norm_num_groups=12)
    with pytest.raises(ValueError, match=r"norm_num_groups=32 .*\[16, 32\]\); \[16\] are not"):
        AutoencoderConfig(ch=16, ch_mult=(1, 2), norm_num_groups=32)
    with pytest.raises(ValueError, match="norm_num_groups must be an int >= 1; got 0"):
        AutoencoderConfig(norm_num_groups=0)
    # a diffusers folder saying so: one error naming the file and the value
    folder = tmp_path / "sd"
    shutil.copytree(sd_folder[0], folder)
    config_file = folder / "vae" / "config.json"
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"norm_num_groups": 12})
    )
    with pytest.raises(
        ArchitectureError, match=r"vae.*config\.json.*norm_num_groups=12 must divide"
    ):
        load_checkpoint(folder)
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"norm_num_groups": 0}))
    with pytest.raises(ArchitectureError, match=r"norm_num_groups=0 is not allowed"):
        load_checkpoint(folder)


def test_spec_round_trip_and_old_specs(checkpoint):
    data = spec_to_dict(checkpoint.spec)
    assert data["unet"]["norm_num_groups"] == data["first_stage"]["norm_num_groups"] == GROUPS
    assert spec_from_dict(data) == checkpoint.spec
    del data["unet"]["norm_num_groups"], data["first_stage"]["norm_num_groups"]
    with pytest.raises(ValueError, match="norm_num_groups"):  # old spec: 32, which 16 channels
        spec_from_dict(data)  # of this VAE cannot take
    data["first_stage"]["ch"] = 32
    old = spec_from_dict(data)
    assert old.unet.norm_num_groups == old.first_stage.norm_num_groups == 32
    for bad in (0, -1, True, "8", 2.0):
        data["unet"]["norm_num_groups"] = bad
        with pytest.raises(ValueError, match="UNetConfig.norm_num_groups"):
            spec_from_dict(data)


def test_compvis_export_is_refused(checkpoint, tmp_path):
    destination = tmp_path / "model.safetensors"
    with pytest.raises(UnsupportedExportError, match=r"unet\.norm_num_groups=8.*always use 32"):
        checkpoint.save_pretrained(destination, format="compvis")
    assert not destination.exists()
