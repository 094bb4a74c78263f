"""UNet parity with diffusers (PyTorch) on tiny random-weight models, through the key tables."""

import dataclasses

import diffusers
import jax
import numpy as np
import pytest
import torch
from support.tiny_specs import PARITY_UNET

from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config, diffusers_unet_table
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.models.params import abstract_params
from ldm_jax.models.unet import UNet, UNetConfig
from ldm_jax.presets.unets import UNET_PRESETS

CONTEXT_DIM = 24
# SD-like layout at toy size: attention at ds 1 and 2, none at the deepest level.
BASE = PARITY_UNET
CROSS = dataclasses.replace(BASE, use_spatial_transformer=True, context_dim=CONTEXT_DIM)


def _diffusers_model(config: UNetConfig):
    name, kwargs = diffusers_unet_config(config)
    torch.manual_seed(0)
    model = getattr(diffusers, name)(**kwargs).eval()
    with torch.no_grad():  # move norms off (1, 0) and zero-initialised layers off zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(config: UNetConfig, y=None):
    rng = np.random.default_rng(0)
    size = max(8, config.downsampling_factor)
    x = rng.standard_normal((2, size, size, config.in_channels)).astype(np.float32)
    t = np.array([3, 917])
    context = None
    if config.context_dim:
        context = rng.standard_normal((2, 5, config.context_dim)).astype(np.float32)
    return x, t, context, y


def _load(config, model, inputs):
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    return diffusers_unet_table(config).to_flax(state_dict, abstract_params(UNet(config), *inputs))


def _check(parity, name, config, y=None):
    model = _diffusers_model(config)
    inputs = _inputs(config, y)
    params = _load(config, model, inputs)
    ours = UNet(config).apply({"params": params}, *inputs)
    x, t, context, y = inputs
    kwargs = {}
    if context is not None:
        kwargs["encoder_hidden_states"] = torch.from_numpy(context)
    if y is not None:
        kwargs["class_labels"] = torch.from_numpy(y)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), **kwargs).sample
    parity(name, ours, ref.permute(0, 2, 3, 1).numpy())
    return model, params


def test_sd1_style_conv_proj_cross_attention(parity):
    _, kwargs = diffusers_unet_config(CROSS)
    assert kwargs["down_block_types"][-1] == "DownBlock2D"
    assert kwargs["use_linear_projection"] is False
    _check(parity, "unet (a) SD1-style cross-attention", CROSS)


def test_sd2_style_linear_proj_head_channels_upcast(parity):
    config = dataclasses.replace(
        CROSS,
        num_heads=-1,
        num_head_channels=16,
        use_linear_in_transformer=True,
        upcast_attention=True,
    )
    _, kwargs = diffusers_unet_config(config)
    # diffusers' attention_head_dim means heads per level: 32 // 16, 64 // 16, 64 // 16.
    assert kwargs["attention_head_dim"] == (2, 4, 4)
    assert kwargs["use_linear_projection"] and kwargs["upcast_attention"]
    _check(parity, "unet (b) SD2-style linear proj, head channels", config)


def test_class_labels_with_scale_shift_norm(parity):
    config = dataclasses.replace(CROSS, num_classes=10, use_scale_shift_norm=True)
    _check(parity, "unet (c) class labels + scale-shift", config, y=np.array([1, 7]))


def test_adm_sequential_label_embedding(parity):
    config = dataclasses.replace(CROSS, num_classes="sequential", adm_in_channels=12)
    y = np.random.default_rng(1).standard_normal((2, 12)).astype(np.float32)
    _, kwargs = diffusers_unet_config(config)
    assert kwargs["class_embed_type"] == "projection"
    _check(parity, "unet (d) adm / sequential", config, y=y)


def test_depth_two_only_cross_attention_per_level_res_blocks(parity):
    config = dataclasses.replace(
        CROSS,
        transformer_depth=2,
        disable_self_attentions=(True, False, True),
        num_res_blocks=(1, 2, 1),
    )
    _, kwargs = diffusers_unet_config(config)
    assert kwargs["only_cross_attention"] == (True, False, True)
    _check(parity, "unet (e) depth 2 + only_cross_attention", config)


def test_unconditional_plain_attention_blocks(parity):
    config = dataclasses.replace(BASE, num_heads=-1, num_head_channels=16)
    _, kwargs = diffusers_unet_config(config)
    assert kwargs["down_block_types"] == ("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    _check(parity, "unet (f) unconditional, plain attention", config)


def test_resblock_updown_with_scale_shift(parity):
    config = dataclasses.replace(
        BASE,
        num_heads=-1,
        num_head_channels=16,
        attention_resolutions=(2,),
        resblock_updown=True,
        use_scale_shift_norm=True,
        num_classes=5,
    )
    _, kwargs = diffusers_unet_config(config)
    assert kwargs["down_block_types"][0] == "ResnetDownsampleBlock2D"
    assert kwargs["downsample_type"] == kwargs["upsample_type"] == "resnet"
    _check(parity, "unet (g) resblock up/down + scale-shift", config, y=np.array([0, 4]))


def test_table_round_trip_is_bit_exact_and_loads_into_diffusers():
    model = _diffusers_model(CROSS)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    table = diffusers_unet_table(CROSS)
    params = _load(CROSS, model, _inputs(CROSS))
    exported = table.to_torch(params)
    assert exported.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    again = table.to_flax(exported, params)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_mismatched_state_dict_raises():
    model = _diffusers_model(CROSS)
    inputs = _inputs(CROSS)
    abstract = abstract_params(UNet(CROSS), *inputs)
    table = diffusers_unet_table(CROSS)
    good = {k: v.numpy() for k, v in model.state_dict().items()}

    missing = dict(good)
    del missing["mid_block.attentions.0.proj_in.weight"]
    with pytest.raises(CheckpointMismatchError, match="proj_in"):
        table.to_flax(missing, abstract)
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        table.to_flax(good | {"mid_block.extra.weight": np.zeros(3)}, abstract)
    # A checkpoint of another architecture (wider context) fails on shapes.
    other = dataclasses.replace(CROSS, context_dim=CONTEXT_DIM + 8)
    wide = {k: v.numpy() for k, v in _diffusers_model(other).state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        table.to_flax(wide, abstract)
    # SD2 layout (linear proj_in) into an SD1 table: rank check of the 1x1-conv transform.
    linear = dataclasses.replace(CROSS, use_linear_in_transformer=True)
    linear_sd = {k: v.numpy() for k, v in _diffusers_model(linear).state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="rank-4"):
        table.to_flax(linear_sd, abstract)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(conv_resample=False), "conv_resample"),
        (dict(resblock_updown=True), "resblock_updown"),
        (dict(num_heads=3), "head width"),
    ],
)
def test_configs_diffusers_cannot_express_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        diffusers_unet_config(dataclasses.replace(CROSS, **changes))


def test_unconditional_configs_diffusers_cannot_express_raise():
    # Per-level head widths (num_heads with growing channels) are not a UNet2DModel option.
    with pytest.raises(ValueError, match="one head width"):
        diffusers_unet_config(BASE)
    with pytest.raises(ValueError, match="num_res_blocks"):
        diffusers_unet_config(
            dataclasses.replace(BASE, num_head_channels=16, num_res_blocks=(1, 2, 1))
        )


@pytest.mark.parametrize(
    "name", ["sd-v1", "sd-v2-base", "ldm-cin256-v2", "ldm-celebahq-256", "ldm-bsr-sr"]
)
def test_tables_match_full_size_diffusers_models(name):
    """Every key and shape of the published-size diffusers model (built on the meta device)."""
    config = UNET_PRESETS[name]
    class_name, kwargs = diffusers_unet_config(config)
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inputs = _inputs(config)
    abstract = flatten_params(abstract_params(UNet(config), *inputs))
    table = diffusers_unet_table(config)
    assert {e.torch_key for e in table.entries} == shapes.keys()
    for entry in table.entries:
        want = entry.transform.torch_shape(abstract[entry.flax_path].shape)
        assert shapes[entry.torch_key] == want, entry


def test_published_diffusers_configs():
    """The Stable Diffusion presets give the configs of the published diffusers UNets."""
    _, sd1 = diffusers_unet_config(UNET_PRESETS["sd-v1"])
    assert sd1["attention_head_dim"] == 8 and sd1["cross_attention_dim"] == 768
    assert sd1["block_out_channels"] == (320, 640, 1280, 1280)
    assert sd1["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert sd1["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    _, sd2 = diffusers_unet_config(UNET_PRESETS["sd-v2-768-v"])
    assert sd2["attention_head_dim"] == (5, 10, 20, 20) and sd2["cross_attention_dim"] == 1024
    assert sd2["use_linear_projection"] is True
    _, inpaint = diffusers_unet_config(UNET_PRESETS["sd-v1-inpainting"])
    assert inpaint["in_channels"] == 9
