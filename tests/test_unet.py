"""UNet: presets, head-count rules, input validation, remat and bf16 (no PyTorch needed)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.params import abstract_params, count_params
from ldm_jax.models.unet import UNet, UNetConfig, attention_heads, unet_layout
from ldm_jax.presets.tiny import TINY_UNET
from ldm_jax.presets.unets import PREDICTION_TYPES, UNET_PRESETS

TINY = dataclasses.replace(TINY_UNET, attention_resolutions=(2,), context_dim=16, dropout=0.1)


# One level (no resampling) keeps the compiled tests below fast.
SMALL = dataclasses.replace(TINY, channel_mult=(1,), attention_resolutions=(1,))


def _example_inputs(config: UNetConfig, batch=1, size=None):
    size = size or config.downsampling_factor
    x = jnp.zeros((batch, size, size, config.in_channels))
    t = jnp.zeros((batch,), jnp.int32)
    context = jnp.zeros((batch, 7, config.context_dim)) if config.context_dim else None
    y = None
    if isinstance(config.num_classes, int):
        y = jnp.zeros((batch,), jnp.int32)
    elif config.num_classes == "sequential":
        y = jnp.zeros((batch, config.adm_in_channels))
    return x, t, context, y


def _random_params(config, seed=0, scale=0.2):
    """Random values everywhere (init zeroes the last convs, which would hide every difference)."""
    rng = np.random.default_rng(seed)
    abstract = abstract_params(UNet(config), *_example_inputs(config))
    return jax.tree.map(
        lambda a: (scale * rng.standard_normal(a.shape)).astype(np.float32), abstract
    )


def test_sd_v1_parameter_count_is_exact():
    unet = UNet(UNET_PRESETS["sd-v1"])
    assert count_params(abstract_params(unet, *_example_inputs(unet.config))) == 859_520_964


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_every_preset_builds_abstractly(name):
    config = UNET_PRESETS[name]
    inputs = _example_inputs(config, size=2 * config.downsampling_factor)
    out, variables = jax.eval_shape(
        lambda: UNet(config).init_with_output(jax.random.key(0), *inputs)
    )
    assert out.shape == inputs[0].shape[:3] + (config.out_channels,)
    assert count_params(variables["params"]) > 0
    assert PREDICTION_TYPES[name] == ("v" if name == "sd-v2-768-v" else "eps")


def test_attention_head_rules_follow_openaimodel():
    sd1, sd2 = UNET_PRESETS["sd-v1"], UNET_PRESETS["sd-v2-base"]
    assert attention_heads(sd1, 640) == (8, 80)  # num_heads fixed, width grows
    assert attention_heads(sd2, 640) == (10, 64)  # head width fixed, heads grow
    assert attention_heads(UNET_PRESETS["ldm-cin256-v2"], 576) == (1, 576)  # legacy, 1 head
    assert attention_heads(UNET_PRESETS["ldm-celebahq-256"], 672) == (21, 32)
    assert attention_heads(UNET_PRESETS["ldm-lsun-churches-256"], 384) == (8, 48)
    # legacy + plain AttentionBlock: num_head_channels (-1) is passed on, so num_heads decides.
    legacy_plain = UNetConfig(num_heads=5, channel_mult=(1,))
    assert attention_heads(legacy_plain, 320) == (5, 64)
    # non-legacy: dim_head = channels // num_heads, and AttentionBlock recomputes the heads
    # from it (32 // 12 = 2 -> 16 heads), or rejects a width that does not divide the channels.
    plain = dataclasses.replace(legacy_plain, legacy=False, num_heads=12)
    assert attention_heads(plain, 32) == (16, 2)
    with pytest.raises(ValueError, match="not divisible"):
        attention_heads(dataclasses.replace(plain, num_heads=5), 96)


def test_layout_matches_openaimodel_block_numbering():
    layout = unet_layout(UNET_PRESETS["sd-v1"])
    assert len(layout.input_blocks) == 11 and len(layout.output_blocks) == 12
    assert [b.index for b in layout.input_blocks if b.resample] == [3, 6, 9]
    assert [b.index for b in layout.output_blocks if b.resample] == [2, 5, 8]
    assert [b.index for b in layout.output_blocks if b.attention] == list(range(3, 12))
    assert layout.output_blocks[0].in_channels == 2560 and layout.middle_channels == 1280
    # semantic synthesis: attention resolutions beyond the deepest ds -> middle only.
    semantic = unet_layout(UNET_PRESETS["ldm-semantic-synthesis-256"])
    assert not any(b.attention for b in semantic.input_blocks + semantic.output_blocks)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_heads=-1), "num_heads or num_head_channels"),
        (dict(context_dim=None), "context_dim"),
        (dict(num_classes="continuous"), "sequential"),
        (dict(num_classes="sequential"), "adm_in_channels"),
        (dict(num_res_blocks=(1, 2, 3)), "one entry per level"),
        (dict(disable_self_attentions=(True,)), "one entry per level"),
    ],
)
def test_invalid_configs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **changes)


def _shape_check(config, x, t, context=None, y=None):
    jax.eval_shape(lambda: UNet(config).init(jax.random.key(0), x, t, context, y))


CLASSES = dataclasses.replace(TINY, num_classes=10)
ADM = dataclasses.replace(TINY, num_classes="sequential", adm_in_channels=6)
PLAIN = dataclasses.replace(TINY, use_spatial_transformer=False, context_dim=None)
X, T, C = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,)), jnp.zeros((2, 7, 16))


@pytest.mark.parametrize(
    "config, args, match",
    [
        (TINY, (jnp.zeros((2, 8, 7, 4)), T, C), "multiples of 2"),
        (TINY, (jnp.zeros((2, 8, 8, 3)), T, C), "in_channels=4"),
        (TINY, (jnp.zeros((8, 8, 4)), T, C), "NHWC"),
        (TINY, (X, jnp.zeros((3,)), C), "timesteps"),
        (TINY, (X, T, None), "context"),
        (TINY, (X, T, jnp.zeros((2, 7, 12))), "context_dim 16"),
        (TINY, (X, T, jnp.zeros((2, 16))), r"\[2, S, 16\]"),
        (PLAIN, (X, T, C), "no cross-attention"),
        (TINY, (X, T, C, jnp.zeros((2,), jnp.int32)), "not class-conditional"),
        (CLASSES, (X, T, C), "needs y"),
        (CLASSES, (X, T, C, jnp.zeros((2, 1), jnp.int32)), r"y must be \[2\]"),
        (ADM, (X, T, C, jnp.zeros((2, 5))), r"y must be \[2, 6\]"),
    ],
)
def test_invalid_inputs_raise(config, args, match):
    with pytest.raises(ValueError, match=match):
        _shape_check(config, *args)


def test_scalar_timestep_broadcasts():
    out = jax.eval_shape(lambda: UNet(TINY).init_with_output(jax.random.key(0), X, 5, C))[0]
    assert out.shape == (2, 8, 8, 4)


def test_remat_gives_identical_outputs_and_gradients():
    params = _random_params(SMALL)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    t, context = jnp.array([10, 500]), jax.random.normal(jax.random.key(2), (2, 7, 16))

    def loss(p, remat):
        out = UNet(SMALL, remat=remat).apply(
            {"params": p}, x, t, context, deterministic=False, rngs={"dropout": jax.random.key(3)}
        )
        return jnp.mean(out**2), out

    def has_remat(remat):  # the primitive is "remat2" in jax 0.10, "checkpoint" later
        jaxpr = str(jax.make_jaxpr(lambda p: loss(p, remat))(params))
        return "remat" in jaxpr or "checkpoint[" in jaxpr

    assert not has_remat("none")
    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    g_plain, out_plain = grad(params, "none")
    for policy in ("blocks", "save_dots_no_batch"):
        assert has_remat(policy)
        g_remat, out_remat = grad(params, policy)
        np.testing.assert_array_equal(out_remat, out_plain)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_remat, g_plain
        )


def test_remat_policies_keep_less_for_the_backward_pass():
    """Bytes the forward pass keeps for the backward pass (the jaxpr's residuals): each policy
    that saves less keeps strictly less."""
    from jax._src.ad_checkpoint import saved_residuals

    params = _random_params(SMALL)
    x = jnp.zeros((2, 8, 8, 4))
    t, context = jnp.array([10, 500]), jnp.zeros((2, 7, 16))

    def kept_bytes(remat):
        def loss(p):
            return jnp.mean(UNet(SMALL, remat=remat).apply({"params": p}, x, t, context) ** 2)

        residuals = saved_residuals(loss, params)
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in residuals)

    kept = {name: kept_bytes(name) for name in ("none", "save_dots", "save_dots_no_batch",
                                                "blocks")}
    assert kept["none"] > kept["save_dots"] > kept["save_dots_no_batch"] > kept["blocks"], kept


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="allowed: none, blocks"):
        UNet(SMALL, remat="everything").init(jax.random.key(0), X, jnp.array([1, 2]), C)


def test_bf16_compute_is_finite_and_close_to_fp32():
    params = _random_params(SMALL)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    t, context = jnp.array([10, 999]), jax.random.normal(jax.random.key(2), (2, 7, 16))
    ours32 = UNet(SMALL).apply({"params": params}, x, t, context)
    ours16 = UNet(SMALL, dtype=jnp.bfloat16).apply({"params": params}, x, t, context)
    assert ours16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(ours16)))
    error = float(jnp.abs(ours16.astype(jnp.float32) - ours32).max() / jnp.abs(ours32).max())
    assert error < 0.05, error


def test_zero_initialised_output_layers():
    # openaimodel zero-inits each ResBlock's last conv, attention output projections and the
    # output conv: a fresh UNet
    # predicts zeros.
    config = dataclasses.replace(SMALL, use_spatial_transformer=False, context_dim=None)
    x, t, _, _ = _example_inputs(config, batch=1, size=4)
    out, variables = jax.jit(UNet(config).init_with_output)(jax.random.key(0), x + 1.0, t)
    params = nn.meta.unbox(variables["params"])
    assert not np.any(np.asarray(out))
    assert not np.any(params["out_conv"]["kernel"])
    assert not np.any(params["middle_res_0"]["out_conv"]["kernel"])
    assert not np.any(params["middle_attn"]["attn"]["out"]["kernel"])  # zero_module(proj_out)
    assert np.any(params["middle_res_0"]["in_conv"]["kernel"])
