"""The whole-checkpoint CompVis table: prefixes, ignorable keys, EMA weights, bad files."""

import dataclasses

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from support.tiny_specs import TINY_VQ

from ldm_jax.checkpoints.compvis.autoencoder import compvis_first_stage_table
from ldm_jax.checkpoints.compvis.checkpoint_table import (
    COMPVIS_IGNORABLE,
    DIFFUSION_BUFFERS,
    SCALE_FACTOR_KEY,
    compvis_checkpoint_table,
    ema_key,
    ema_state_dict,
    has_ema_weights,
    without_training_loss,
)
from ldm_jax.checkpoints.compvis.unet import compvis_unet_table
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config, diffusers_unet_table
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.checkpoints.transformers_clip import clip_text_abstract_params
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.conditioning import (
    ClassEmbedder,
    ClassEmbedderConfig,
    SpatialRescaler,
    SpatialRescalerConfig,
)
from ldm_jax.models.ldm_bert import LDMBert, LDMBertConfig
from ldm_jax.models.params import abstract_params
from ldm_jax.models.unet import UNet
from ldm_jax.models.vq import VQConfig, VQModel
from ldm_jax.presets.tiny import TINY_UNET, TINY_VAE
from ldm_jax.spec import CondStageSpec, ModelSpec

CLIP = CLIPTextConfig(vocab_size=99, max_length=16, width=32, num_layers=2, num_heads=4, mlp_dim=37)
UNET = dataclasses.replace(
    TINY_UNET, attention_resolutions=(1,), context_dim=CLIP.width, legacy=True
)
VAE = TINY_VAE
LDM_BERT = LDMBertConfig(
    vocab_size=50, max_length=8, width=32, num_layers=2, num_heads=2, head_dim=8, mlp_dim=16
)
SD = ModelSpec(first_stage=VAE, unet=UNET, cond_stage=CondStageSpec("clip", CLIP))


def _abstract(spec: ModelSpec) -> dict:
    image = jnp.zeros((1, 32, 32, 3))
    first = VQModel(spec.first_stage) if isinstance(spec.first_stage, VQConfig) else None
    out = {"first_stage": abstract_params(first or AutoencoderKL(spec.first_stage), image)}
    if spec.unet is not None:
        cfg = spec.unet
        x, t = jnp.zeros((1, 8, 8, cfg.in_channels)), jnp.zeros((1,), jnp.int32)
        context = jnp.zeros((1, 4, cfg.context_dim)) if cfg.context_dim else None
        out["unet"] = abstract_params(UNet(cfg), x, t, context)
    cond = spec.cond_stage
    if cond is not None:
        if cond.kind in ("clip", "openclip"):
            out["cond_stage"] = clip_text_abstract_params(cond.config)
        elif cond.kind == "ldm_bert":
            ids = jnp.zeros((1, cond.config.max_length), jnp.int32)
            out["cond_stage"] = abstract_params(LDMBert(cond.config), ids)
        elif cond.kind == "class":
            out["cond_stage"] = abstract_params(ClassEmbedder(cond.config), jnp.zeros(1, int))
        else:
            segmentation = jnp.zeros((1, 32, 32, cond.config.in_channels))
            out["cond_stage"] = abstract_params(SpatialRescaler(cond.config), segmentation)
    return out


def _random(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


def _assert_trees_equal(a, b):
    flat_a, flat_b = flatten_params(a), flatten_params(b)
    assert flat_a.keys() == flat_b.keys()
    for path, value in flat_a.items():
        np.testing.assert_array_equal(np.asarray(flat_b[path]), value, err_msg=str(path))


def _buffers():
    return {k: np.zeros(3, np.float32) for k in DIFFUSION_BUFFERS}


def test_sd_like_checkpoint_round_trip_with_buffers_and_ema():
    table = compvis_checkpoint_table(SD)
    params = _random(_abstract(SD))
    compvis = table.to_torch(params)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    counts = {p: sum(k.startswith(p) for k in compvis) for p in prefixes}
    assert counts == {
        "model.diffusion_model.": len(compvis_unet_table(UNET)),
        "first_stage_model.": len(compvis_first_stage_table(VAE)),
        "cond_stage_model.transformer.": 4 + 2 * 16,  # embeddings, final norm, 16 a block
    }
    assert sum(counts.values()) == len(compvis)
    # A full (non-pruned) file: schedule buffers, position_ids, the EMA copy of the UNet.
    ema = {ema_key(k): v + 1 for k, v in compvis.items() if k.startswith("model.diffusion_model.")}
    extras = (
        _buffers()
        | ema
        | {"cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(16)[None]}
    )
    full = compvis | extras
    assert has_ema_weights(full) and not has_ema_weights(compvis | _buffers())
    _assert_trees_equal(table.to_flax(full, params), params)
    again = table.to_torch(table.to_flax(compvis, params))
    assert again.keys() == compvis.keys()
    for key, value in compvis.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    # The EMA view: UNet values from model_ema.*, everything else untouched, no model_ema keys.
    view = ema_state_dict(full)
    assert not any(k.startswith("model_ema.") for k in view)
    assert len(view) == len(full) - len(ema) - 2  # EMA weights, decay and num_updates consumed
    ema_params = table.to_flax(view, params)
    key = "model.diffusion_model.input_blocks.0.0.bias"
    np.testing.assert_array_equal(view[key], compvis[key] + 1)
    np.testing.assert_array_equal(ema_params["unet"]["conv_in"]["bias"], compvis[key] + 1)
    _assert_trees_equal(ema_params["first_stage"], params["first_stage"])


def test_ema_names_are_the_ones_diffusers_extracts():
    """diffusers' converter with extract_ema=True reads `model_ema.<dotless name>`."""
    assert (
        ema_key("model.diffusion_model.input_blocks.0.0.weight")
        == "model_ema.diffusion_modelinput_blocks00weight"
    )
    name, kwargs = diffusers_unet_config(UNET)
    assert name == "UNet2DConditionModel"
    model = diffusers.UNet2DConditionModel(**kwargs)
    unet_params = _random(_abstract(SD)["unet"], seed=1)
    compvis = compvis_unet_table(UNET).to_torch(unet_params)
    assert len(compvis) > 100  # diffusers only looks for EMA weights in files with > 100
    checkpoint = {"model.diffusion_model." + k: torch.zeros(v.shape) for k, v in compvis.items()}
    checkpoint |= {
        ema_key("model.diffusion_model." + k): torch.tensor(v) for k, v in compvis.items()
    }
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(model.config), extract_ema=True)
    params = diffusers_unet_table(UNET).to_flax(
        {k: v.numpy() for k, v in converted.items()}, unet_params
    )
    _assert_trees_equal(params, unet_params)
    # Ours, from the same file:
    view = ema_state_dict({k: v.numpy() for k, v in checkpoint.items()})
    ours = compvis_unet_table(UNET).prefixed("model.diffusion_model.").to_flax(view, unet_params)
    _assert_trees_equal(ours, unet_params)


def test_missing_and_stray_ema_weights_are_listed():
    compvis = compvis_checkpoint_table(SD).to_torch(_random(_abstract(SD)))
    unet_keys = [k for k in compvis if k.startswith("model.diffusion_model.")]
    ema = {ema_key(k): compvis[k] for k in unet_keys}
    lost = ema_key(unet_keys[3])
    with pytest.raises(CheckpointMismatchError, match=f"1 missing EMA keys: {lost}"):
        ema_state_dict(compvis | {k: v for k, v in ema.items() if k != lost})
    with pytest.raises(CheckpointMismatchError, match="match no UNet key: model_ema.stray"):
        ema_state_dict(compvis | ema | {"model_ema.stray": np.zeros(1)})


def test_mismatches_name_the_offending_keys():
    table = compvis_checkpoint_table(SD)
    params = _random(_abstract(SD))
    compvis = table.to_torch(params)
    missing = {k: v for k, v in compvis.items() if k != "first_stage_model.quant_conv.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: first_stage_model\.quant"):
        table.to_flax(missing, params)
    # Keys of another cond stage (SD 2's OpenCLIP head) or another network are unexpected.
    stray = {"cond_stage_model.model.logit_scale": np.float32(1), "model.diffusion_model.x": 1}
    with pytest.raises(
        CheckpointMismatchError, match=r"2 unexpected keys: cond_stage_model\.model"
    ):
        table.to_flax(compvis | stray, params)
    # A training checkpoint's loss keys are not part of an LDM file either.
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: loss\.logvar"):
        table.to_flax(compvis | {"loss.logvar": np.zeros(())}, params)


@pytest.mark.parametrize(
    "cond",
    [
        CondStageSpec("openclip", dataclasses.replace(CLIP, activation="gelu", skip_last_layers=1)),
        CondStageSpec("ldm_bert", LDM_BERT),
        CondStageSpec("class", ClassEmbedderConfig(n_classes=11, embed_dim=32, null_class=10)),
        CondStageSpec("spatial_rescaler", SpatialRescalerConfig(in_channels=5, out_channels=3)),
        None,
    ],
    ids=["sd2-openclip", "ldm-bert", "class", "spatial-rescaler", "unconditional"],
)
def test_every_cond_stage_composes(cond):
    unet = UNET
    if cond is None:
        unet = dataclasses.replace(UNET, use_spatial_transformer=False, context_dim=None)
    elif cond.kind == "spatial_rescaler":  # concat conditioning: no cross-attention
        unet = dataclasses.replace(
            UNET, in_channels=7, use_spatial_transformer=False, context_dim=None
        )
    spec = ModelSpec(first_stage=VAE, unet=unet, cond_stage=cond)
    table = compvis_checkpoint_table(spec)
    params = _random(_abstract(spec))
    compvis = table.to_torch(params)
    cond_keys = sorted(k for k in compvis if k.startswith("cond_stage_model."))
    expected_first = {
        None: None,
        "openclip": "cond_stage_model.model.ln_final.bias",
        "ldm_bert": "cond_stage_model.transformer.attn_layers.layers.0.0.bias",
        "class": "cond_stage_model.embedding.weight",
        "spatial_rescaler": "cond_stage_model.channel_mapper.weight",
    }[cond and cond.kind]
    assert (cond_keys[0] if cond_keys else None) == expected_first
    unused = {"openclip": {"cond_stage_model.model.logit_scale": np.float32(1)}}
    extra = unused.get(cond and cond.kind, {}) | _buffers()
    _assert_trees_equal(table.to_flax(compvis | extra, params), params)


def test_standalone_first_stage_files_and_first_stage_as_cond_stage():
    vq = dataclasses.replace(TINY_VQ, n_embed=8, mid_attention=False)
    spec = ModelSpec(first_stage=vq)
    table = compvis_checkpoint_table(spec)
    params = _random(_abstract(spec))
    compvis = table.to_torch(params)
    assert "quantize.embedding.weight" in compvis and "encoder.conv_in.weight" in compvis
    loss = {"loss.logvar": np.zeros(()), "loss.discriminator.main.0.weight": np.zeros((2, 3))}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: loss\.disc"):
        table.to_flax(compvis | loss, params)
    view = without_training_loss(compvis | loss)
    assert len(view) == len(compvis) and "loss.logvar" not in view
    _assert_trees_equal(table.to_flax(view, params), params)
    with pytest.raises(ValueError, match="cannot have a cond stage"):
        compvis_checkpoint_table(ModelSpec(first_stage=vq), first_stage_as_cond_stage=True)

    # LDM inpainting (`cond_stage_config: __is_first_stage__`): torch saves the first stage
    # twice, under first_stage_model. and cond_stage_model.
    unet = dataclasses.replace(UNET, in_channels=7, use_spatial_transformer=False, context_dim=None)
    ldm = ModelSpec(first_stage=vq, unet=unet)
    ldm_params = _random(_abstract(ldm))
    ldm_file = compvis_checkpoint_table(ldm).to_torch(ldm_params)
    twice = ldm_file | {
        "cond_stage_model." + k.removeprefix("first_stage_model."): v
        for k, v in ldm_file.items()
        if k.startswith("first_stage_model.")
    }
    with pytest.raises(CheckpointMismatchError, match="unexpected keys: cond_stage_model"):
        compvis_checkpoint_table(ldm).to_flax(twice, ldm_params)
    table = compvis_checkpoint_table(ldm, first_stage_as_cond_stage=True)
    _assert_trees_equal(table.to_flax(twice, ldm_params), ldm_params)


def test_ignorable_keys_are_named_in_one_place():
    for key in (
        "betas",
        "alphas_cumprod",
        "posterior_mean_coef2",
        "model_ema.num_updates",
        SCALE_FACTOR_KEY,
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.model.text_projection",
    ):
        assert key in COMPVIS_IGNORABLE, key
    # Every ignorable key a composed table accepts (EMA weights aside) is listed there.
    specs = [SD, dataclasses.replace(SD, cond_stage=CondStageSpec("openclip", CLIP))]
    for spec in specs:
        accepted = compvis_checkpoint_table(spec).ignorable
        assert {k for k in accepted if not k.startswith("model_ema.")} <= COMPVIS_IGNORABLE
