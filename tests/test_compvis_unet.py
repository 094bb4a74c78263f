"""CompVis UNet key table, checked against diffusers' own CompVis converter and numerically.

diffusers weights -> our params (diffusers table) -> CompVis state dict (table under test) ->
diffusers' `convert_ldm_unet_checkpoint` must give back every original tensor bit for bit; for
layouts that converter does not know (plain openaimodel attention, resblock up/down, average-pool
resampling) a functional openaimodel forward over the CompVis keys must match diffusers / ours.
"""

import dataclasses

import diffusers
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from references.openaimodel_reference import _Net, unet_forward
from support.tiny_specs import PARITY_UNET

from ldm_jax.checkpoints.compvis.unet import compvis_unet_table
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config, diffusers_unet_table
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.models.params import abstract_params
from ldm_jax.models.unet import UNet, UNetConfig
from ldm_jax.presets.unets import UNET_PRESETS

PREFIX = "model.diffusion_model."
CONTEXT_DIM = 24
BASE = PARITY_UNET
SD1 = dataclasses.replace(BASE, use_spatial_transformer=True, context_dim=CONTEXT_DIM)
SD2 = dataclasses.replace(
    SD1,
    num_heads=-1,
    num_head_channels=16,
    use_linear_in_transformer=True,
    num_res_blocks=2,
    transformer_depth=2,
    disable_self_attentions=(True, False, True),
)
PLAIN = dataclasses.replace(BASE, num_heads=-1, num_head_channels=16)  # 2 and 4 heads
UPDOWN = dataclasses.replace(
    PLAIN,
    attention_resolutions=(2,),
    resblock_updown=True,
    use_scale_shift_norm=True,
    num_classes=5,
)


def _inputs(config: UNetConfig):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, config.in_channels)).astype(np.float32)
    t = np.array([3, 917])
    context = y = None
    if config.context_dim:
        context = rng.standard_normal((2, 5, config.context_dim)).astype(np.float32)
    if isinstance(config.num_classes, int):
        y = np.array([1, config.num_classes - 1])
    elif config.num_classes == "sequential":
        y = rng.standard_normal((2, config.adm_in_channels)).astype(np.float32)
    return x, t, context, y


def _diffusers_model(config: UNetConfig):
    name, kwargs = diffusers_unet_config(config)
    torch.manual_seed(0)
    model = getattr(diffusers, name)(**kwargs).eval()
    with torch.no_grad():  # move norms off (1, 0) and zero-initialised layers off zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _to_compvis(config: UNetConfig, model):
    """(diffusers state dict, our params, CompVis state dict) for a diffusers model."""
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    abstract = abstract_params(UNet(config), *_inputs(config))
    params = diffusers_unet_table(config).to_flax(state_dict, abstract)
    return state_dict, params, compvis_unet_table(config).to_torch(params)


def _torch(state_dict):
    return {k: torch.tensor(v) for k, v in state_dict.items()}


def _reference(compvis, config: UNetConfig, x, t, context, y):
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2)
    cond = None if context is None else torch.from_numpy(context)
    label = None if y is None else torch.from_numpy(y)
    with torch.no_grad():
        out, used = unet_forward(_torch(compvis), config, x_t, torch.from_numpy(t), cond, label)
    assert used == set(compvis), f"keys the openaimodel forward never read: {set(compvis) - used}"
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "config",
    [
        SD1,
        SD2,
        dataclasses.replace(SD1, num_classes=10, use_scale_shift_norm=True),
        dataclasses.replace(SD1, num_classes="sequential", adm_in_channels=12),
    ],
    ids=["sd1-conv-proj", "sd2-linear-depth2-cross-only", "class-labels", "adm-sequential"],
)
def test_diffusers_converter_reads_our_export_bit_exactly(config):
    model = _diffusers_model(config)
    original, params, compvis = _to_compvis(config, model)
    assert all(k.count(".") >= 1 and not k.startswith(PREFIX) for k in compvis)
    converted = convert_ldm_unet_checkpoint(
        {PREFIX + k: torch.from_numpy(v) for k, v in compvis.items()}, dict(model.config)
    )
    assert converted.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(converted[key].numpy(), value, err_msg=key)
    # CompVis -> ours -> CompVis is the identity on every tensor.
    again = compvis_unet_table(config).to_torch(compvis_unet_table(config).to_flax(compvis, params))
    assert again.keys() == compvis.keys()
    for key, value in compvis.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


@pytest.mark.parametrize(
    "name, config",
    [("plain attention", PLAIN), ("resblock up/down + scale-shift + classes", UPDOWN)],
)
def test_openaimodel_forward_on_our_export_matches_diffusers(name, config, parity):
    model = _diffusers_model(config)
    _, _, compvis = _to_compvis(config, model)
    x, t, context, y = _inputs(config)
    with torch.no_grad():
        label = None if y is None else torch.from_numpy(y)
        x_t = torch.from_numpy(x).permute(0, 3, 1, 2)
        expected = model(x_t, torch.from_numpy(t), class_labels=label).sample
    ours = _reference(compvis, config, x, t, context, y)
    parity(f"compvis unet table: {name} (openaimodel forward)", ours, expected.permute(0, 2, 3, 1))


def test_openaimodel_forward_matches_ours_where_diffusers_cannot_express_it(parity):
    # Per-level head widths (4 heads everywhere), average-pool resampling and per-level depth.
    config = dataclasses.replace(BASE, num_heads=4, conv_resample=False, num_res_blocks=(1, 2, 1))
    with pytest.raises(ValueError):
        diffusers_unet_config(config)
    inputs = _inputs(config)
    params = _randomized(abstract_params(UNet(config), *inputs))
    compvis = compvis_unet_table(config).to_torch(params)
    assert not any(".op." in k or k.endswith("conv.weight") for k in compvis)  # no resample convs
    ours = UNet(config).apply({"params": params}, *inputs)
    parity(
        "compvis unet table: avg-pool resample, legacy heads",
        _reference(compvis, config, *inputs),
        ours,
    )


def _randomized(params):
    """Replace every parameter (zero-initialised ones included) by noise of a sane scale."""
    flat = flatten_params(params)
    rng = np.random.default_rng(1)
    noisy = {p: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for p, v in flat.items()}
    for path in noisy:
        if path[-1] == "scale":
            noisy[path] += 1.0
    return jax.tree.map(jnp.asarray, flax.traverse_util.unflatten_dict(noisy))


def test_per_head_qkv_split_matches_diffusers_attention(parity):
    """openaimodel's fused qkv conv interleaves heads ([h0 q k v, h1 q k v]); diffusers keeps
    separate q/k/v. Run the legacy attention on our exported `qkv` against diffusers' block."""
    model = _diffusers_model(PLAIN)
    _, _, compvis = _to_compvis(PLAIN, model)
    attention = model.mid_block.attentions[0]  # 64 channels, 4 heads
    heads = attention.heads
    assert heads == 4
    p = "middle_block.1"
    qkv = compvis[f"{p}.qkv.weight"]
    q, k, v = (getattr(attention, n).weight.detach().numpy() for n in ("to_q", "to_k", "to_v"))
    # The layout really is per head: plain [q; k; v] stacking would be another tensor.
    assert not np.array_equal(qkv[:, :, 0], np.concatenate([q, k, v]))
    np.testing.assert_array_equal(qkv[:, :, 0].reshape(heads, 3, 16, 64)[:, 1].reshape(64, 64), k)

    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    net = _Net(_torch(compvis), PLAIN)
    with torch.no_grad():
        ours = net.attention_block(p, x, heads)
        expected = attention(x)
    parity("compvis unet table: per-head qkv split", ours.numpy(), expected.numpy())


def test_compvis_key_names_of_the_resample_and_label_layouts():
    keys = set(compvis_unet_table(UPDOWN).to_torch(_params(UPDOWN)))
    # Level 2 has no attention: its up-ResBlock is child 1; level 1 attends: child 2.
    assert {
        "output_blocks.1.1.in_layers.2.weight",
        "label_emb.weight",
        "input_blocks.2.0.in_layers.0.weight",  # down-ResBlock in the Downsample slot
        "output_blocks.3.2.emb_layers.1.weight",  # level 1 (attends): res, attn, up-ResBlock
        "middle_block.1.qkv.weight",
        "middle_block.1.proj_out.weight",
    } <= keys
    assert not any(".op." in k or ".conv." in k for k in keys)
    sd1 = set(compvis_unet_table(SD1).to_torch(_params(SD1)))
    assert {
        "input_blocks.2.0.op.weight",
        "output_blocks.1.1.conv.weight",
        "output_blocks.3.2.conv.weight",
        "time_embed.2.bias",
    } <= sd1
    adm = dataclasses.replace(SD1, num_classes="sequential", adm_in_channels=12)
    assert {"label_emb.0.0.weight", "label_emb.0.2.bias"} <= set(
        compvis_unet_table(adm).to_torch(_params(adm))
    )


def _params(config):
    return jax.tree.map(
        lambda s: np.zeros(s.shape, np.float32), abstract_params(UNet(config), *_inputs(config))
    )


def test_mismatched_compvis_state_dicts_raise():
    params = _params(SD1)
    table = compvis_unet_table(SD1)
    good = table.to_torch(params)
    missing = dict(good)
    del missing["output_blocks.2.1.proj_in.weight"]
    with pytest.raises(
        CheckpointMismatchError, match=r"missing keys: output_blocks\.2\.1\.proj_in"
    ):
        table.to_flax(missing, params)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: middle_block\.3\.weight"):
        table.to_flax(good | {"middle_block.3.weight": np.zeros(3)}, params)
    # An SD 2 file (linear proj_in/out) is not an SD 1 architecture.
    sd2_like = compvis_unet_table(dataclasses.replace(SD1, use_linear_in_transformer=True))
    with pytest.raises(CheckpointMismatchError, match="rank-4"):
        table.to_flax(sd2_like.to_torch(params), params)


def _abstract_preset(config: UNetConfig):
    f = config.downsampling_factor
    context = jnp.zeros((1, 77, config.context_dim)) if config.context_dim else None
    y = jnp.zeros((1,), jnp.int32) if isinstance(config.num_classes, int) else None
    t = jnp.zeros((1,), jnp.int32)
    return abstract_params(UNet(config), jnp.zeros((1, f, f, config.in_channels)), t, context, y)


def _meta_state_dict(table, abstract) -> dict[str, torch.Tensor]:
    """The CompVis tensors of `table` as shape-only (meta) tensors, fused ones merged."""
    flat = flatten_params(abstract)
    out = {}
    for entry in table.entries:
        paths = getattr(entry, "flax_paths", None) or (entry.flax_path,)
        shapes = [entry.transform.torch_shape(flat[p].shape) for p in paths]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        out[entry.torch_key] = torch.empty(shape, device="meta")
    return out


@pytest.mark.parametrize("name", ["sd-v1", "sd-v2-base"])
def test_full_size_tables_match_diffusers_layout_of_the_published_models(name):
    """SD 1.5 / 2.1 UNets, shapes only (meta tensors): our CompVis table, read by diffusers'
    converter, gives exactly the keys and shapes of diffusers' UNet2DConditionModel."""
    config = UNET_PRESETS[name]
    abstract = _abstract_preset(config)
    table = compvis_unet_table(config)
    table.check_covers(abstract)
    compvis = {PREFIX + k: v for k, v in _meta_state_dict(table, abstract).items()}
    assert len(compvis) == 686  # the tensor count of every SD 1.x / 2.x UNet
    _, kwargs = diffusers_unet_config(config)
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(compvis, dict(model.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    published = {"sd-v1": 859_520_964, "sd-v2-base": 865_910_724}[name]
    assert sum(int(np.prod(s)) for s in expected.values()) == published


# One preset per distinct LDM-zoo architecture (celebahq/ffhq/bedrooms share one UNet).
ZOO = [
    "sd-v1-inpainting",
    "ldm-celebahq-256",
    "ldm-lsun-churches-256",
    "ldm-cin256-v2",
    "ldm-txt2img-1p4b",
    "ldm-bsr-sr",
    "ldm-inpainting-big",
    "ldm-semantic-synthesis-256",
]


@pytest.mark.parametrize("name", ZOO)
def test_full_size_zoo_tables_cover_every_parameter(name):
    config = UNET_PRESETS[name]
    abstract = _abstract_preset(config)
    table = compvis_unet_table(config)
    table.check_covers(abstract)
    shapes = _meta_state_dict(table, abstract)
    total = sum(int(np.prod(v.shape)) for v in shapes.values())
    assert total == sum(int(np.prod(v.shape)) for v in flatten_params(abstract).values())
    if not config.use_spatial_transformer:  # fused qkv: 3 x channels outputs, kernel 1
        c = config.model_channels * config.channel_mult[-1]
        assert shapes["middle_block.1.qkv.weight"].shape == (3 * c, c, 1)
