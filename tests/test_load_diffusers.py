"""Loading diffusers pipeline folders (and hub ids) against diffusers' own PyTorch networks."""

import dataclasses
import json
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from references.torch_reference import nchw, nhwc, randomize_
from support.tiny_pipelines import TEXT_WIDTH, sd_pipeline

from ldm_jax.checkpoints import load_checkpoint
from ldm_jax.checkpoints.diffusers.autoencoder import vq_model_table
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config
from ldm_jax.checkpoints.diffusers.unet_config import unet_config_from_diffusers
from ldm_jax.checkpoints.errors import (
    ArchitectureError,
    CheckpointFileError,
    CheckpointMismatchError,
)
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.clip_text import CLIPTextTransformer
from ldm_jax.models.params import abstract_params
from ldm_jax.models.unet import UNet, UNetConfig
from ldm_jax.models.vq import VQModel
from ldm_jax.presets.tiny import TINY_UNET
from ldm_jax.presets.unets import UNET_PRESETS
from ldm_jax.tokenizers import CLIPTokenizer


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pipe = sd_pipeline()
    folder = tmp_path_factory.mktemp("sd") / "pipeline"
    pipe.save_pretrained(folder)
    return folder, pipe


def test_stable_diffusion_folder_matches_diffusers(sd_folder, parity):
    folder, pipe = sd_folder
    checkpoint = load_checkpoint(folder)
    spec = checkpoint.spec
    assert spec.cond_stage.kind == "clip" and spec.cond_stage.config.num_heads == 2
    assert spec.unet.num_heads == 8 and spec.unet.context_dim == TEXT_WIDTH
    assert dataclasses.astuple(spec.diffusion) == (
        1000, "scaled_linear", 0.00085, 0.012, "v_prediction", 0.13025, "crossattn", 8, None,
        "leading", 1, True,  # StableDiffusionPipeline sets steps_offset=1; DDIM's default alpha
    )  # fmt: skip
    assert isinstance(checkpoint.tokenizer, CLIPTokenizer)
    assert checkpoint.tokenizer(["a photo"]).shape == (1, 77)
    params = checkpoint.params

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3, 917])
    context = rng.standard_normal((2, 7, TEXT_WIDTH)).astype(np.float32)
    ours = UNet(spec.unet).apply({"params": params["unet"]}, x, t, context)
    with torch.no_grad():
        ref = pipe.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample
    parity("load diffusers folder: unet", ours, nhwc(ref))

    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    vae = AutoencoderKL(spec.first_stage)
    decoded = vae.apply({"params": params["first_stage"]}, z, method="decode")
    with torch.no_grad():
        ref = pipe.vae.decode(nchw(z)).sample
    parity("load diffusers folder: vae decode", decoded, nhwc(ref))

    ids = checkpoint.tokenizer(["a tiny random model", "x"])
    text = CLIPTextTransformer(spec.cond_stage.config)
    out = text.apply({"params": params["cond_stage"]}, ids)
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state
    parity("load diffusers folder: text encoder", out.last_hidden_state, ref.numpy())


def test_bfloat16_loading_casts_every_parameter(sd_folder):
    folder, _ = sd_folder
    fp32 = load_checkpoint(folder).params
    bf16 = load_checkpoint(folder, dtype=jnp.bfloat16).params
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(fp32), jax.tree.leaves(bf16), strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


def test_text_model_prefixed_layout_and_prediction_override(sd_folder, tmp_path):
    folder, _ = sd_folder
    copy = shutil.copytree(folder, tmp_path / "copy")
    weights = copy / "text_encoder" / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    assert not any(k.startswith("text_model.") for k in tensors)  # transformers 5 layout
    safetensors.numpy.save_file({f"text_model.{k}": v for k, v in tensors.items()}, str(weights))
    with pytest.warns(UserWarning, match="overrides 'v_prediction'"):
        loaded = load_checkpoint(copy, prediction_type="epsilon")
    assert loaded.spec.diffusion.prediction_type == "epsilon"
    reference = load_checkpoint(folder).params["cond_stage"]
    _assert_same(reference, loaded.params["cond_stage"])


def test_unconditional_ldm_folder(tmp_path, parity):
    unet = diffusers.UNet2DModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        sample_size=8,
    )
    vqvae = diffusers.VQModel(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=3,
        num_vq_embeddings=16,
        layers_per_block=1,
    )
    randomize_(unet, 0)
    randomize_(vqvae, 1)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0195)
    diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    spec = checkpoint.spec
    assert spec.cond_stage is None and checkpoint.tokenizer is None
    assert spec.first_stage_kind == "vq" and spec.first_stage.n_embed == 16
    assert spec.unet.num_head_channels == 16 and not spec.unet.use_spatial_transformer
    assert (spec.diffusion.scale_factor, spec.diffusion.conditioning_key) == (1.0, None)
    assert (spec.diffusion.beta_schedule, spec.diffusion.linear_end) == ("linear", 0.0195)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 8, 3)).astype(np.float32)
    t = np.array([10])
    ours = UNet(spec.unet).apply({"params": checkpoint.params["unet"]}, x, t)
    with torch.no_grad():
        ref = unet.eval()(nchw(x), torch.from_numpy(t)).sample
    parity("load diffusers folder: unconditional unet", ours, nhwc(ref))
    state_dict = {k: v.numpy() for k, v in vqvae.state_dict().items()}
    image = np.zeros((1, 8, 8, 3), np.float32)
    expected = vq_model_table(spec.first_stage).to_flax(
        state_dict, abstract_params(VQModel(spec.first_stage), image)
    )
    _assert_same(expected, checkpoint.params["first_stage"])


def test_ldm_text_to_image_folder_with_bert(tmp_path, parity):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
        LDMBertConfig,
        LDMBertModel,
    )

    from ldm_jax.models.ldm_bert import LDMBert
    from ldm_jax.tokenizers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "##s"]
    tokenizer = BertTokenizer({w: i for i, w in enumerate(words)}).hf_tokenizer
    bert = LDMBertModel(
        LDMBertConfig(
            vocab_size=len(words),
            max_position_embeddings=16,
            encoder_layers=2,
            encoder_ffn_dim=40,
            encoder_attention_heads=2,
            head_dim=12,
            d_model=32,
        )
    )
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    vqvae = diffusers.AutoencoderKL(
        block_out_channels=(32,), latent_channels=4, layers_per_block=1, scaling_factor=0.18215
    )
    for seed, model in enumerate((bert, unet, vqvae)):
        randomize_(model, seed)
    diffusers.LDMTextToImagePipeline(
        vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=diffusers.DDIMScheduler()
    ).save_pretrained(tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    cond = checkpoint.spec.cond_stage
    assert (cond.kind, cond.trainable, cond.config.logits_head) == ("ldm_bert", True, True)
    assert checkpoint.spec.diffusion.conditioning_key == "crossattn"
    assert isinstance(checkpoint.tokenizer, BertTokenizer)
    ids = checkpoint.tokenizer(["a red cubes", "a"])
    assert ids.shape == (2, 16)
    ours = LDMBert(cond.config).apply({"params": checkpoint.params["cond_stage"]}, ids)
    with torch.no_grad():
        ref = bert.eval()(torch.from_numpy(ids).long()).last_hidden_state
    parity("load diffusers folder: ldm bert", ours, ref.numpy())


ROUND_TRIP = {
    **{
        name: UNET_PRESETS[name]
        for name in ("sd-v1", "sd-v2-base", "sd-v1-inpainting", "ldm-cin256-v2", "ldm-celebahq-256")
    },
    "per-level depth, cross-only, classes": dataclasses.replace(
        TINY_UNET,
        channel_mult=(1, 2, 2),
        num_res_blocks=(1, 2, 1),
        context_dim=24,
        transformer_depth=(2, 1, 1),
        disable_self_attentions=(True, False, False),
        num_classes=7,
        use_scale_shift_norm=True,
        upcast_attention=True,
    ),
    "adm sequential": dataclasses.replace(
        UNET_PRESETS["sd-v2-base"], num_classes="sequential", adm_in_channels=12
    ),
    "unconditional resblock up/down": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        num_head_channels=16,
        resblock_updown=True,
        use_scale_shift_norm=True,
    ),
}


@pytest.mark.parametrize("config", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_unet_config_is_the_inverse_of_diffusers_unet_config(config):
    name, kwargs = diffusers_unet_config(config)
    ours = unet_config_from_diffusers({"_class_name": name, **json.loads(json.dumps(kwargs))})
    # Equal up to what changes no computation: attention_resolutions' order and, where the
    # heads are given as a count or width, openaimodel's `legacy` head rule.
    canonical = dataclasses.replace(
        config,
        attention_resolutions=tuple(sorted(config.attention_resolutions, reverse=True)),
        legacy=ours.legacy,
    )
    assert ours == canonical
    assert diffusers_unet_config(ours) == (name, kwargs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"mid_block_type": None}, "mid_block_type=None"),
        ({"up_block_types": ["UpBlock2D"] * 4}, "do not mirror"),
        ({"attention_head_dim": [5, 8, 20, 20]}, "neither one count nor one width"),
        ({"brand_new_option": 3}, "unknown option brand_new_option=3"),
    ],
)
def test_unsupported_unet_configs_are_named(change, message):
    _, kwargs = diffusers_unet_config(UNET_PRESETS["sd-v1"])
    with pytest.raises(ArchitectureError, match=message):
        unet_config_from_diffusers(kwargs | change)


def test_folder_errors_name_the_problem(sd_folder, tmp_path):
    folder, _ = sd_folder
    with pytest.raises(CheckpointFileError, match="without model_index.json.*accepted"):
        load_checkpoint(folder / "unet")
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointFileError, match="vae holds no weights.*model.safetensors"):
        load_checkpoint(copy)
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", copy / "vae")
    with pytest.raises(CheckpointMismatchError, match="vae: .*missing keys: decoder.conv_in"):
        load_checkpoint(copy)
    with pytest.raises(ValueError, match="apply to CompVis single files"):
        load_checkpoint(folder, use_ema=True)
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        load_checkpoint(folder, prediction_type="x0")


def test_hub_id_offline_says_to_pass_a_local_path(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointFileError, match="hub failed.*pass a local path"):
        load_checkpoint("someone/some-model")
    with pytest.raises(CheckpointFileError, match="no such file or folder"):
        load_checkpoint("not/a/hub/id.safetensors")
