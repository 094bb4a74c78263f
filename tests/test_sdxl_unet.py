"""SDXL UNet: text_time parity with diffusers (tiny base, refiner), presets vs diffusers sizes."""

import dataclasses
import json

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from references.torch_reference import nchw, nhwc, randomize_, state_dict_numpy

from ldm_jax.checkpoints.compvis.unet import compvis_unet_table
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config, diffusers_unet_table
from ldm_jax.checkpoints.diffusers.unet_config import unet_config_from_diffusers
from ldm_jax.checkpoints.errors import ArchitectureError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.models.params import abstract_params, count_params
from ldm_jax.models.text_time import text_time_embedding, time_ids
from ldm_jax.models.unet import UNet, UNetConfig, unet_layout
from ldm_jax.presets.unets import UNET_PRESETS

POOLED = 16  # width of the tiny "pooled text embedding"
TIME_DIM = 8  # addition_time_embed_dim of the tiny models

# diffusers configs written the way the published SDXL unet/config.json files are.
TINY_BASE_DIFFUSERS = dict(
    block_out_channels=[32, 64],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2],
    attention_head_dim=[4, 8],  # heads per level: 8-channel heads
    cross_attention_dim=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=8,
)
TINY_REFINER_DIFFUSERS = TINY_BASE_DIFFUSERS | dict(
    block_out_channels=[16, 32, 64, 64],
    layers_per_block=1,
    transformer_layers_per_block=2,
    attention_head_dim=[2, 4, 8, 8],
    cross_attention_dim=24,
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
# The same networks as openaimodel / SGM hyper-parameters (sd_xl_base.yaml style).
TINY_BASE = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attention_resolutions=(2,),
    num_head_channels=8,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=(1, 2),
    context_dim=32,
    num_classes="sequential",
    adm_in_channels=POOLED + 6 * TIME_DIM,
    addition_time_embed_dim=TIME_DIM,
    legacy=False,
    norm_num_groups=8,
)
TINY_REFINER = dataclasses.replace(
    TINY_BASE,
    model_channels=16,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=1,
    attention_resolutions=(4, 2),
    transformer_depth=2,
    context_dim=24,
    adm_in_channels=POOLED + 5 * TIME_DIM,
)

# stabilityai/stable-diffusion-xl-{base,refiner}-1.0 unet/config.json (architecture fields).
SDXL_BASE_DIFFUSERS = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
)
SDXL_REFINER_DIFFUSERS = SDXL_BASE_DIFFUSERS | dict(
    block_out_channels=[384, 768, 1536, 1536],
    transformer_layers_per_block=4,
    attention_head_dim=[6, 12, 24, 24],
    cross_attention_dim=1280,
    projection_class_embeddings_input_dim=2560,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)


def _reference(kwargs: dict) -> diffusers.UNet2DConditionModel:
    model = diffusers.UNet2DConditionModel(**kwargs).eval()
    randomize_(model, seed=0)
    return model


def _same_network(ours: UNetConfig, want: UNetConfig) -> None:
    """Equal up to how the same blocks are written (attention_resolutions' order, `legacy`,
    heads as a count or a width)."""
    assert unet_layout(ours) == unet_layout(want)
    heads = ("attention_resolutions", "legacy", "num_heads", "num_head_channels")
    assert ours == dataclasses.replace(want, **{f: getattr(ours, f) for f in heads})


def _micro_conditioning(config: UNetConfig, batch: int):
    """Pooled embeddings and realistic ids (sizes in pixels, crops, aesthetic score)."""
    rng = np.random.default_rng(1)
    pooled = rng.standard_normal((batch, POOLED)).astype(np.float32)
    n_ids = (config.adm_in_channels - POOLED) // TIME_DIM
    original, crop = [[1024, 768], [512, 896]], [[0, 0], [64, 32]]
    if n_ids == 6:
        ids = time_ids(original, crop, target_size=[[1024, 1024], [768, 1344]])
    else:
        ids = time_ids(original, crop, aesthetic_score=[6.0, 2.5])
    return pooled, np.array(ids)


@pytest.mark.parametrize(
    "name, config, diffusers_kwargs",
    [
        ("base", TINY_BASE, TINY_BASE_DIFFUSERS),
        ("refiner", TINY_REFINER, TINY_REFINER_DIFFUSERS),
    ],
)
def test_text_time_parity_with_diffusers(parity, name, config, diffusers_kwargs):
    _same_network(unet_config_from_diffusers(diffusers_kwargs), config)
    model = _reference(diffusers_kwargs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3, 917])
    context = rng.standard_normal((2, 7, config.context_dim)).astype(np.float32)
    pooled, ids = _micro_conditioning(config, batch=2)
    y = text_time_embedding(pooled, ids, TIME_DIM)
    assert y.shape == (2, config.adm_in_channels)

    inputs = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), y)
    table = diffusers_unet_table(config)
    params = table.to_flax(state_dict_numpy(model), abstract_params(UNet(config), *inputs))
    ours = UNet(config).apply({"params": params}, *inputs)
    added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)}
    with torch.no_grad():
        ref = model(
            nchw(x), torch.from_numpy(t), torch.from_numpy(context), added_cond_kwargs=added
        )
        time_embeds = model.add_time_proj(added["time_ids"].flatten()).reshape(2, -1)
    ref_y = torch.concat([added["text_embeds"], time_embeds], dim=-1)
    parity(f"sdxl text_time vector ({name})", y, ref_y.numpy())
    parity(f"sdxl unet text_time ({name})", ours, nhwc(ref.sample))

    # the table is exact both ways: the export loads into diffusers as is
    exported = table.to_torch(params)
    assert exported.keys() == model.state_dict().keys()
    assert "add_embedding.linear_1.weight" in exported
    model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


@pytest.mark.parametrize(
    "name, published, count",
    [
        ("sdxl-base", SDXL_BASE_DIFFUSERS, 2_567_463_684),
        ("sdxl-refiner", SDXL_REFINER_DIFFUSERS, 2_259_526_660),
    ],
)
def test_presets_are_the_published_diffusers_unets(name, published, count):
    """Same config both ways, same parameter count, every key and shape of the meta model."""
    config = UNET_PRESETS[name]
    _same_network(unet_config_from_diffusers(published), config)
    class_name, kwargs = diffusers_unet_config(config)
    unused = ("sample_size", "addition_embed_type_num_heads")  # no effect on the network
    expected = {k: v for k, v in published.items() if k not in unused}
    assert {k: json.loads(json.dumps(kwargs[k])) for k in expected} == expected
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**published)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inputs = (
        jnp.zeros((1, 8, 8, 4)),
        jnp.zeros((1,)),
        jnp.zeros((1, 77, config.context_dim)),
        jnp.zeros((1, config.adm_in_channels)),
    )
    abstract = abstract_params(UNet(config), *inputs)
    assert count_params(abstract) == sum(p.numel() for p in model.parameters()) == count
    flat = flatten_params(abstract)
    table = diffusers_unet_table(config)
    assert {e.torch_key for e in table.entries} == shapes.keys()
    for entry in table.entries:
        assert shapes[entry.torch_key] == entry.transform.torch_shape(flat[entry.flax_path].shape)


def test_text_time_features_layout():
    """Per id: [cos(t f), sin(t f)], f_i = 10000^(-i/half); ids one after the other."""
    pooled = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    y = np.asarray(text_time_embedding(pooled, ids, 4))
    assert y.shape == (2, 3 + 2 * 4)
    np.testing.assert_array_equal(y[:, :3], pooled)
    freqs = 10000.0 ** (-np.arange(2) / 2)
    want = np.concatenate([np.cos(3.0 * freqs), np.sin(3.0 * freqs)])
    np.testing.assert_allclose(y[1, 7:], want, rtol=1e-6)
    np.testing.assert_array_equal(y[0, 3:7], [1, 1, 0, 0])  # id 0


def test_time_ids_order_and_broadcast():
    base = time_ids((1024, 768), (0, 16), target_size=(1024, 1024))
    np.testing.assert_array_equal(base, [[1024, 768, 0, 16, 1024, 1024]])
    refiner = time_ids([[512, 512]], (0, 0), aesthetic_score=[6.0, 2.5])
    np.testing.assert_array_equal(refiner, [[512, 512, 0, 0, 6.0], [512, 512, 0, 0, 2.5]])
    with pytest.raises(ValueError, match="exactly one"):
        time_ids((1, 1), (0, 0))
    with pytest.raises(ValueError, match="pairs"):
        time_ids((1, 1, 1), (0, 0), target_size=(1, 1))
    with pytest.raises(ValueError, match="batch sizes differ"):
        time_ids([[1, 1], [2, 2]], (0, 0), aesthetic_score=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="pooled"):
        text_time_embedding(np.zeros((2, 3)), np.zeros((3, 6)))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="addition_time_embed_dim must be None or an int >= 1"):
        dataclasses.replace(TINY_BASE, addition_time_embed_dim=0)
    with pytest.raises(ValueError, match="needs num_classes='sequential'"):
        dataclasses.replace(TINY_BASE, num_classes=None, adm_in_channels=None)
    with pytest.raises(ValueError, match=r"transformer_depth \(0, 2\) is < 1 at level\(s\) \[0\]"):
        dataclasses.replace(TINY_BASE, attention_resolutions=(1, 2), transformer_depth=(0, 2))
    # a depth of 0 where no attention runs is fine (ComfyUI writes SDXL's depths so)
    dataclasses.replace(TINY_BASE, transformer_depth=(0, 2))
    for change, message in [
        (dict(addition_time_embed_dim=None), "needs projection_class_embeddings_input_dim"),
        (dict(class_embed_type="projection"), "together with a class_embed_type"),
        (dict(addition_embed_type="text"), "addition_embed_type='text'"),
        (dict(addition_embed_type=None), "without addition_embed_type='text_time'"),
        (dict(num_class_embeds=10), "num_class_embeds together"),
    ]:
        with pytest.raises(ArchitectureError, match=message):
            unet_config_from_diffusers(TINY_BASE_DIFFUSERS | change)


def test_diffusers_single_file_converter_reads_the_sgm_layout_bit_exactly():
    """diffusers weights -> ours -> SGM `model.diffusion_model.*` keys (CompVis table) ->
    diffusers' own converter gives back every tensor, add_embedding included."""
    model = _reference(TINY_BASE_DIFFUSERS)
    original = state_dict_numpy(model)
    inputs = (
        jnp.zeros((1, 8, 8, 4)),
        jnp.zeros((1,)),
        jnp.zeros((1, 7, TINY_BASE.context_dim)),
        jnp.zeros((1, TINY_BASE.adm_in_channels)),
    )
    abstract = abstract_params(UNet(TINY_BASE), *inputs)
    params = diffusers_unet_table(TINY_BASE).to_flax(original, abstract)
    sgm = compvis_unet_table(TINY_BASE).to_torch(params)
    assert "label_emb.0.0.weight" in sgm
    converted = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: torch.from_numpy(v) for k, v in sgm.items()},
        dict(model.config),
    )
    assert converted.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(converted[key].numpy(), value, err_msg=key)
