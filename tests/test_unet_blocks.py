"""UNet building blocks against their PyTorch counterparts (diffusers / torch.nn.functional)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import Downsample2D, Upsample2D
from support.tiny_specs import UNCONDITIONAL_VQ

from ldm_jax.checkpoints.key_table import Transform
from ldm_jax.models.params import abstract_params
from ldm_jax.models.unet import UNet
from ldm_jax.models.unet_blocks import Downsample, ResBlock, Upsample, timestep_embedding

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 8, 6, 32)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).detach().numpy()


@pytest.mark.parametrize("dim", [320, 33])
def test_timestep_embedding_matches_diffusers_flip_sin_to_cos(parity, dim):
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    ref = get_timestep_embedding(
        torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0
    )
    ours = timestep_embedding(jnp.asarray(t), dim)
    assert ours.shape == (4, dim) and ours.dtype == jnp.float32
    parity(f"unet timestep_embedding dim {dim}", ours, ref.numpy())
    np.testing.assert_allclose(ours[0, : dim // 2], 1.0)  # cos first: cos(0) = 1


def test_pooling_resamplers_match_torch(parity):
    down = Downsample(use_conv=False).apply({}, X)
    parity("unet Downsample avg-pool", down, _nhwc(F.avg_pool2d(_nchw(X), 2, 2)))
    up = Upsample(use_conv=False).apply({}, X)
    parity("unet Upsample nearest", up, _nhwc(F.interpolate(_nchw(X), scale_factor=2.0)))


@pytest.mark.parametrize("kind", ["down", "up"])
def test_conv_resamplers_match_diffusers(parity, kind):
    torch.manual_seed(0)
    if kind == "down":
        ref_module, ours_module = Downsample2D(32, use_conv=True, padding=1), Downsample()
        conv_name, torch_conv = "op", "conv"
    else:
        ref_module, ours_module = Upsample2D(32, use_conv=True), Upsample()
        conv_name, torch_conv = "conv", "conv"
    weight = getattr(ref_module, torch_conv).weight.detach().numpy()
    bias = getattr(ref_module, torch_conv).bias.detach().numpy()
    params = {conv_name: {"kernel": Transform.CONV.to_flax(weight), "bias": bias}}
    ours = ours_module.apply({"params": params}, X)
    with torch.no_grad():
        ref = _nhwc(ref_module(_nchw(X)))
    assert ours.shape == ref.shape
    parity(f"unet {kind}sample conv", ours, ref)


def test_resblock_rejects_unknown_resample():
    block = ResBlock(32, resample="sideways")
    with pytest.raises(ValueError, match="'down' or 'up'"):
        jax.eval_shape(lambda: block.init(jax.random.key(0), X, jnp.zeros((2, 8))))


def test_conv_resample_false_builds_pooling_unet():
    config = dataclasses.replace(UNCONDITIONAL_VQ.unet, num_head_channels=32, conv_resample=False)
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,))
    params = abstract_params(UNet(config), x, t)
    assert "input_blocks_2_down" not in params  # avg-pool and nearest upsampling: no weights
    assert "output_blocks_2_up" not in params
    out = jax.eval_shape(lambda: UNet(config).init_with_output(jax.random.key(0), x, t))[0]
    assert out.shape == (1, 8, 8, 3)
