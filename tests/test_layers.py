"""Shared layers: fp32 norms and the attention entry point against their PyTorch counterparts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_jax.models.attention import MultiHeadAttention, dot_product_attention
from ldm_jax.models.layers import GroupNorm, LayerNorm
from ldm_jax.models.params import init_params


def _random_affine(rng, channels):
    return {
        "scale": rng.normal(size=channels).astype(np.float32),
        "bias": rng.normal(size=channels).astype(np.float32),
    }


def test_group_norm_matches_torch(parity):
    rng = np.random.default_rng(0)
    x_BHWC = (rng.normal(size=(2, 5, 6, 64)) * 3 + 1).astype(np.float32)
    params = _random_affine(rng, 64)
    ours = GroupNorm(32, 1e-6).apply({"params": params}, x_BHWC)
    reference = torch.nn.GroupNorm(32, 64, eps=1e-6)
    reference.weight.data = torch.tensor(params["scale"])
    reference.bias.data = torch.tensor(params["bias"])
    expected = reference(torch.tensor(x_BHWC).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    parity("layers/group_norm", ours, expected.detach().numpy())


def test_group_norm_computes_in_fp32_and_casts_back():
    x = jnp.full((1, 2, 2, 32), 300.0, jnp.bfloat16) + jnp.arange(32, dtype=jnp.bfloat16)
    params = init_params(GroupNorm(32, 1e-6), jax.random.key(0), x)
    y = GroupNorm(32, 1e-6, dtype=jnp.bfloat16).apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y)))


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible by 32 groups"):
        GroupNorm(32).init(jax.random.key(0), jnp.ones((1, 4, 4, 48)))


def test_layer_norm_matches_torch(parity):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2, 7, 48)) * 2 - 1).astype(np.float32)
    params = _random_affine(rng, 48)
    ours = LayerNorm(1e-5).apply({"params": params}, x)
    reference = torch.nn.LayerNorm(48, eps=1e-5)
    reference.weight.data = torch.tensor(params["scale"])
    reference.bias.data = torch.tensor(params["bias"])
    parity("layers/layer_norm", ours, reference(torch.tensor(x)).detach().numpy())


@pytest.mark.parametrize("is_causal", [False, True])
def test_dot_product_attention_matches_torch_sdpa(parity, is_causal):
    rng = np.random.default_rng(2)
    q, k, v = (rng.normal(size=(2, 9, 3, 16)).astype(np.float32) for _ in range(3))
    ours = dot_product_attention(q, k, v, is_causal=is_causal)
    to_bnth = lambda a: torch.tensor(a).permute(0, 2, 1, 3)
    expected = F.scaled_dot_product_attention(
        to_bnth(q), to_bnth(k), to_bnth(v), is_causal=is_causal
    )
    parity(f"attention/sdpa causal={is_causal}", ours, expected.permute(0, 2, 1, 3).numpy())


def test_dot_product_attention_respects_mask():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)
    k, v = (rng.normal(size=(1, 6, 2, 8)).astype(np.float32) for _ in range(2))
    mask_BNTS = np.ones((1, 1, 4, 6), dtype=bool)
    mask_BNTS[..., 4:] = False  # padding keys must not contribute
    ours = dot_product_attention(q, k, v, mask_BNTS=mask_BNTS)
    unpadded = dot_product_attention(q, k[:, :4], v[:, :4])
    np.testing.assert_allclose(ours, unpadded, rtol=1e-6, atol=1e-6)


def test_dot_product_attention_upcast_keeps_output_dtype():
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    assert dot_product_attention(q, q, q, upcast=True).dtype == jnp.bfloat16


def test_unknown_attention_implementation_is_rejected():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="allowed"):
        dot_product_attention(q, q, q, implementation="flash")


def test_multi_head_attention_matches_torch_multihead(parity):
    rng = np.random.default_rng(4)
    x_BTC = rng.normal(size=(2, 5, 32)).astype(np.float32)
    context_BSD = rng.normal(size=(2, 7, 24)).astype(np.float32)
    module = MultiHeadAttention(num_heads=4, head_dim=8, qkv_bias=True)
    params = init_params(module, jax.random.key(0), x_BTC, context_BSD)
    params = jax.tree_util.tree_map(
        lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.2, params
    )
    ours = module.apply({"params": params}, x_BTC, context_BSD)

    reference = torch.nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True)
    t = lambda a: torch.tensor(np.asarray(a))
    reference.q_proj_weight.data = t(params["q"]["kernel"].T)
    reference.k_proj_weight.data = t(params["k"]["kernel"].T)
    reference.v_proj_weight.data = t(params["v"]["kernel"].T)
    reference.in_proj_bias.data = t(np.concatenate([params[n]["bias"] for n in ("q", "k", "v")]))
    reference.out_proj.weight.data = t(params["out"]["kernel"].T)
    reference.out_proj.bias.data = t(params["out"]["bias"])
    expected, _ = reference(t(x_BTC), t(context_BSD), t(context_BSD), need_weights=False)
    parity("attention/multi-head cross", ours, expected.detach().numpy())
