"""ClassEmbedder and SpatialRescaler: parity with torch nn.Embedding / F.interpolate (+ conv)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_jax.models.conditioning import (
    INTERPOLATION_METHODS,
    ClassEmbedder,
    ClassEmbedderConfig,
    SpatialRescaler,
    SpatialRescalerConfig,
    drop_class_labels,
    interpolate,
    unconditional_class_ids,
)
from ldm_jax.models.params import abstract_params
from ldm_jax.presets.text_encoders import class_embedder_preset

NULL_CONFIG = ClassEmbedderConfig(n_classes=11, embed_dim=8, null_class=10)


def test_class_embedder_parity(parity):
    torch.manual_seed(0)
    table = torch.nn.Embedding(11, 8)
    ids = np.array([0, 3, 10, 7, 3])
    with torch.no_grad():
        ref = table(torch.from_numpy(ids)[:, None])  # CompVis: batch[key][:, None]
    params = {"embedding": {"embedding": table.weight.detach().numpy()}}
    ours = ClassEmbedder(NULL_CONFIG).apply({"params": params}, jnp.asarray(ids))
    assert ours.shape == (5, 1, 8)
    parity("class_embedder", ours, ref)
    jitted = jax.jit(lambda i: ClassEmbedder(NULL_CONFIG).apply({"params": params}, i))(ids)
    np.testing.assert_array_equal(jitted, ours)


def test_unconditional_ids_and_label_dropping():
    np.testing.assert_array_equal(unconditional_class_ids(NULL_CONFIG, 3), [10, 10, 10])
    ids = jnp.arange(10, dtype=jnp.int32)
    rng = jax.random.key(0)
    np.testing.assert_array_equal(drop_class_labels(NULL_CONFIG, ids, 0.0, rng), ids)
    np.testing.assert_array_equal(drop_class_labels(NULL_CONFIG, ids, 1.0, rng), [10] * 10)
    many = jnp.zeros(20_000, jnp.int32)
    dropped = drop_class_labels(NULL_CONFIG, many, 0.1, rng)
    assert dropped.dtype == jnp.int32
    assert set(np.unique(dropped)) == {0, 10}
    assert abs(float((dropped == 10).mean()) - 0.1) < 0.01
    other = drop_class_labels(NULL_CONFIG, many, 0.1, jax.random.key(1))
    assert not np.array_equal(dropped, other)  # the rng decides which labels go


def test_class_embedder_errors():
    no_null = class_embedder_preset("cin256")
    assert class_embedder_preset("cin256-v2").null_class == 1000
    with pytest.raises(ValueError, match="no null class"):
        unconditional_class_ids(no_null, 2)
    with pytest.raises(ValueError, match="no null class"):
        drop_class_labels(no_null, jnp.zeros(2, jnp.int32), 0.1, jax.random.key(0))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        drop_class_labels(NULL_CONFIG, jnp.zeros(2, jnp.int32), 1.5, jax.random.key(0))
    with pytest.raises(ValueError, match=r"null_class must be in \[0, 10\]"):
        ClassEmbedderConfig(n_classes=11, embed_dim=8, null_class=11)
    model = ClassEmbedder(NULL_CONFIG)
    params = {"embedding": {"embedding": jnp.zeros((11, 8))}}
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model.apply({"params": params}, jnp.array([3, 11]))
    with pytest.raises(ValueError, match=r"\[batch\]"):
        model.apply({"params": params}, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        model.apply({"params": params}, jnp.zeros((2,), jnp.float32))


# Sizes and multipliers where torch's scale_factor-based source coordinates differ from
# in/out-based ones (odd sizes, non-integral in*multiplier), plus the identity-size and 2x cases.
RESIZE_CASES = [
    ((8, 6), 0.5, 1),
    ((7, 5), 0.5, 2),
    ((5, 9), 2.0, 1),
    ((7, 5), 1.5, 1),
    ((9, 10), 1 / 3, 1),
    ((4, 5), 1.2, 1),
    ((5, 6), 2.1, 1),
    ((11, 8), 0.7, 1),
]


def _torch_rescale(x_BHWC, method, multiplier, n_stages):
    y = torch.from_numpy(np.transpose(x_BHWC, (0, 3, 1, 2)))
    for _ in range(n_stages):
        y = F.interpolate(y, scale_factor=multiplier, mode=method)
    return np.transpose(y.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("method", INTERPOLATION_METHODS)
def test_interpolate_matches_torch(parity, method):
    rng = np.random.default_rng(0)
    worst = 0.0
    for (h, w), multiplier, n_stages in RESIZE_CASES:
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        ref = _torch_rescale(x, method, multiplier, n_stages)
        y = x
        for _ in range(n_stages):
            y = interpolate(jnp.asarray(y), multiplier, method)
        assert y.shape == ref.shape, ((h, w), multiplier, method)
        if method.startswith("nearest"):  # a pure gather: must be bit-exact
            np.testing.assert_array_equal(y, ref, err_msg=f"{(h, w)} x{multiplier}")
        worst = max(worst, parity(f"interpolate[{method}] {(h, w)} x{multiplier:.3g}", y, ref))
    assert worst <= 1e-4


@pytest.mark.parametrize("method, bias", [("bilinear", False), ("nearest", True), ("area", True)])
def test_spatial_rescaler_with_channel_mapper(parity, method, bias):
    torch.manual_seed(0)
    cfg = SpatialRescalerConfig(
        n_stages=2, method=method, multiplier=0.5, in_channels=3, out_channels=5, bias=bias
    )
    mapper = torch.nn.Conv2d(3, 5, 1, bias=bias)
    x = np.random.default_rng(1).standard_normal((2, 16, 12, 3)).astype(np.float32)
    with torch.no_grad():
        ref = mapper(
            torch.from_numpy(np.transpose(_torch_rescale(x, method, 0.5, 2), (0, 3, 1, 2)))
        )
    params = {
        "channel_mapper": {"kernel": np.transpose(mapper.weight.detach().numpy(), (2, 3, 1, 0))}
    }
    if bias:
        params["channel_mapper"]["bias"] = mapper.bias.detach().numpy()
    model = SpatialRescaler(cfg)
    shapes = jax.tree.map(np.shape, abstract_params(model, jnp.asarray(x)))
    assert shapes == jax.tree.map(np.shape, params)
    ours = model.apply({"params": params}, jnp.asarray(x))
    parity(f"spatial_rescaler[{method},bias={bias}]", ours, np.transpose(ref.numpy(), (0, 2, 3, 1)))
    bf16 = SpatialRescaler(cfg, dtype=jnp.bfloat16).apply({"params": params}, jnp.asarray(x))
    assert bf16.dtype == jnp.bfloat16 and jnp.isfinite(bf16.astype(jnp.float32)).all()


def test_spatial_rescaler_without_mapper_has_no_params(parity):
    cfg = SpatialRescalerConfig(n_stages=1, method="bicubic", multiplier=2.0)
    x = np.random.default_rng(2).standard_normal((1, 5, 7, 4)).astype(np.float32)
    variables = SpatialRescaler(cfg).init(jax.random.key(0), jnp.asarray(x))
    assert not variables.get("params")
    ours = SpatialRescaler(cfg).apply(variables, jnp.asarray(x))
    parity("spatial_rescaler[bicubic,no mapper]", ours, _torch_rescale(x, "bicubic", 2.0, 1))
    jitted = jax.jit(lambda v: SpatialRescaler(cfg).apply(variables, v))(jnp.asarray(x))
    np.testing.assert_allclose(jitted, ours, rtol=1e-6, atol=1e-6)


def test_spatial_rescaler_errors():
    for method in ("trilinear", "linear", "lanczos"):
        with pytest.raises(ValueError, match="allowed: .*nearest-exact"):
            SpatialRescalerConfig(method=method)
    with pytest.raises(ValueError, match="n_stages"):
        SpatialRescalerConfig(n_stages=-1)
    with pytest.raises(ValueError, match="multiplier"):
        SpatialRescalerConfig(multiplier=0.0)
    cfg = SpatialRescalerConfig(in_channels=3, out_channels=4)
    model = SpatialRescaler(cfg)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        model.init(jax.random.key(0), jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="leaves no pixels"):
        interpolate(jnp.zeros((1, 1, 8, 3)), 0.5, "bilinear")
    with pytest.raises(ValueError, match="allowed"):
        interpolate(jnp.zeros((1, 4, 4, 3)), 0.5, "linear")
