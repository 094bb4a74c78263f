"""diffusers export: the folder loads in PyTorch diffusers and computes what ours computes."""

import dataclasses
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
from references.torch_reference import nchw, nhwc
from support.tiny_specs import SD1_LIKE, UNCONDITIONAL_VQ, random_params

from ldm_jax.atomic import DestinationExistsError
from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.checkpoints.diffusers.export import save_diffusers
from ldm_jax.checkpoints.errors import UnsupportedExportError
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.clip_text import CLIPTextTransformer
from ldm_jax.models.conditioning import ClassEmbedderConfig
from ldm_jax.models.unet import UNet
from ldm_jax.models.vq import VQModel
from ldm_jax.spec import CondStageSpec, DiffusionSpec

RNG = np.random.default_rng(0)
LATENTS = RNG.standard_normal((2, 8, 8, 4)).astype(np.float32)
IDS = np.array([[49406, 320, 1125, 539, 49407] + [49407] * 72] * 2, np.int32)


@pytest.fixture(scope="module")
def sd1_export(tmp_path_factory):
    checkpoint = LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE))
    folder = tmp_path_factory.mktemp("export") / "sd"
    save_diffusers(checkpoint, folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    return checkpoint, folder, pipe


def test_stable_diffusion_pipeline_loads_the_export(sd1_export):
    _, folder, pipe = sd1_export
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.vae.config.scaling_factor == pytest.approx(SD1_LIKE.diffusion.scale_factor)
    assert pipe.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]


def test_exported_networks_match_ours(parity, sd1_export):
    checkpoint, _, pipe = sd1_export
    params, spec = checkpoint.params, checkpoint.spec
    with torch.no_grad():
        text = pipe.text_encoder(torch.from_numpy(IDS).long()).last_hidden_state.numpy()
    ours_text = CLIPTextTransformer(spec.cond_stage.config).apply(
        {"params": params["cond_stage"]}, IDS
    )
    parity("export diffusers/text_encoder", ours_text.last_hidden_state, text)

    t = np.array([10, 900])
    with torch.no_grad():
        eps = pipe.unet(nchw(LATENTS), torch.from_numpy(t), torch.from_numpy(text)).sample
    ours_eps = UNet(spec.unet).apply({"params": params["unet"]}, LATENTS, t, text)
    parity("export diffusers/unet", ours_eps, nhwc(eps))

    with torch.no_grad():
        image = pipe.vae.decode(nchw(LATENTS)).sample
    ours_image = AutoencoderKL(spec.first_stage).apply(
        {"params": params["first_stage"]}, LATENTS, method="decode"
    )
    parity("export diffusers/vae decode", ours_image, nhwc(image))


def test_unconditional_vq_exports_as_ldm_pipeline(parity, tmp_path):
    checkpoint = LatentDiffusionCheckpoint(UNCONDITIONAL_VQ, random_params(UNCONDITIONAL_VQ))
    save_diffusers(checkpoint, tmp_path / "ldm")
    pipe = diffusers.LDMPipeline.from_pretrained(tmp_path / "ldm")
    latents = RNG.standard_normal((1, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        decoded = pipe.vqvae.decode(nchw(latents)).sample
    ours = VQModel(UNCONDITIONAL_VQ.first_stage).apply(
        {"params": checkpoint.params["first_stage"]}, latents, method="decode"
    )
    parity("export diffusers/vqvae decode", ours, nhwc(decoded))


def test_penultimate_openclip_is_written_truncated(tmp_path):
    clip = dataclasses.replace(SD1_LIKE.cond_stage.config, num_layers=3, skip_last_layers=1)
    spec = dataclasses.replace(SD1_LIKE, cond_stage=CondStageSpec("openclip", clip))
    checkpoint = LatentDiffusionCheckpoint(spec, random_params(spec))
    save_diffusers(checkpoint, tmp_path / "sd2")
    config = json.loads((tmp_path / "sd2" / "text_encoder" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd2", safety_checker=None)
    ours = CLIPTextTransformer(clip).apply({"params": checkpoint.params["cond_stage"]}, IDS)
    with torch.no_grad():
        theirs = pipe.text_encoder(torch.from_numpy(IDS).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(ours.last_hidden_state, theirs, rtol=1e-4, atol=1e-5)
    assert pipe.tokenizer.pad_token_id == 0  # OpenCLIP pads with zeros


def test_unsupported_checkpoint_is_refused_before_writing(tmp_path):
    spec = dataclasses.replace(
        SD1_LIKE,
        cond_stage=CondStageSpec("class", ClassEmbedderConfig(n_classes=10, embed_dim=32)),
        diffusion=DiffusionSpec(conditioning_key="crossattn"),
    )
    checkpoint = LatentDiffusionCheckpoint(spec, random_params(spec))
    with pytest.raises(UnsupportedExportError, match="compvis or orbax"):
        save_diffusers(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    checkpoint = LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE))
    with pytest.raises(DestinationExistsError):
        save_diffusers(checkpoint, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_bf16_parameters_export(tmp_path):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), random_params(UNCONDITIONAL_VQ))
    save_diffusers(LatentDiffusionCheckpoint(UNCONDITIONAL_VQ, params), tmp_path / "bf16")
    weights = tmp_path / "bf16" / "unet" / "diffusion_pytorch_model.safetensors"
    with safetensors.safe_open(str(weights), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.bfloat16
    unet = diffusers.UNet2DModel.from_pretrained(weights.parent, torch_dtype=torch.bfloat16)
    assert next(unet.parameters()).dtype == torch.bfloat16
