"""The flash-style blocked attention: same values and gradients as XLA's (its own recomputing
backward pass, padded sequences), no [T, S] residual kept for the backward pass, and when it is
picked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import attention_dispatch
from ldm_jax.models.attention import dot_product_attention
from ldm_jax.models.blocked_attention import block_sizes, blocked_attention


def _qkv(t, s, heads=2, dim=8, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    # scale 3: logits spread wide enough that the running max really moves between key blocks
    q = rng.standard_normal((2, t, heads, dim)) * scale
    k = rng.standard_normal((2, s, heads, dim)) * scale
    v = rng.standard_normal((2, s, heads, dim))
    return (jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


@pytest.mark.parametrize(("t", "s", "q_block", "k_block"), [(64, 96, 16, 32), (32, 32, 32, 32),
                                                             (48, 128, 8, 16)])
def test_matches_xla_attention(t, s, q_block, k_block):
    q, k, v = _qkv(t, s)
    got = blocked_attention(q, k, v, q_block=q_block, k_block=k_block)
    want = _xla(q, k, v)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("t", "s", "q_block", "k_block"), [
    (32, 64, 8, 16),  # several blocks each way
    (50, 77, 16, 32),  # padded queries and masked padded keys
    (37, 131, 16, None),  # prime lengths; keys one default block (131 <= 256)
])
def test_gradients_match_xla_attention(t, s, q_block, k_block):
    q, k, v = _qkv(t, s)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, t, 2, 8)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    blocked = jax.grad(
        loss(lambda q, k, v: blocked_attention(q, k, v, q_block=q_block, k_block=k_block)),
        argnums=(0, 1, 2),
    )(q, k, v)
    reference = jax.grad(loss(_xla), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(blocked, reference, strict=True):
        assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) <= 1e-5


def test_backward_keeps_no_logits():
    """The residuals between forward and backward are q, k, v, the output and one log-sum-exp per
    query: nothing of size T x S (XLA's attention keeps the [B, N, T, S] probabilities)."""
    from jax._src.ad_checkpoint import saved_residuals

    q, k, v = _qkv(256, 256)

    def largest_residual(fn):
        residuals = saved_residuals(lambda q, k, v: jnp.sum(fn(q, k, v)), q, k, v)
        return max(int(np.prod(aval.shape)) for aval, _ in residuals)

    blocked = largest_residual(lambda q, k, v: blocked_attention(q, k, v, q_block=64,
                                                                 k_block=64))
    assert blocked == q.size  # [B, T, N, H]: q, k, v, out
    assert largest_residual(_xla) >= 2 * 2 * 256 * 256  # [B, N, T, S]


def test_bf16_inputs_give_bf16_outputs_close_to_fp32():
    q, k, v = _qkv(32, 64, scale=1.0)
    got = blocked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), q_block=16, k_block=32)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), _xla(q, k, v), atol=3e-2)


def test_block_sizes_divide_or_pad():
    assert block_sizes(4096, 4096) == (512, 256)
    assert block_sizes(64, 77) == (64, 77)  # short sequences: one block each
    assert block_sizes(4096, 77) == (512, 77)  # cross-attention: all keys in one block
    assert block_sizes(6400, 6400) == (400, 256)  # 80x80 latents: the largest divisor
    assert block_sizes(4096, 1000) == (512, 250)
    assert block_sizes(4096, 1031) == (512, 256)  # a prime: padded to 1280 keys, 249 masked
    q, k, v = _qkv(32, 48)  # blocks that do not divide: padded, same values
    np.testing.assert_allclose(blocked_attention(q, k, v, q_block=12, k_block=32), _xla(q, k, v),
                               rtol=1e-5, atol=1e-5)


def _uses_scan(fn, *args):
    return "scan" in str(jax.make_jaxpr(fn)(*args))


def test_cpu_default_picks_blocked_for_long_sequences(monkeypatch):
    monkeypatch.setattr(attention_dispatch, "BLOCKED_MIN_QUERIES_ON_CPU", 64)
    long_q, long_k, long_v = _qkv(64, 64)
    cross = _qkv(64, 7)  # a short context: still blocked (one key block)
    short = _qkv(32, 64)
    assert jax.default_backend() == "cpu"
    assert _uses_scan(dot_product_attention, long_q, long_k, long_v)  # None -> blocked on CPU
    assert _uses_scan(dot_product_attention, *cross)
    assert not _uses_scan(dot_product_attention, *short)  # fewer queries than the threshold
    assert not _uses_scan(lambda *a: dot_product_attention(*a, implementation="xla"),
                          long_q, long_k, long_v)
    np.testing.assert_allclose(dot_product_attention(long_q, long_k, long_v),
                               _xla(long_q, long_k, long_v), rtol=1e-5, atol=1e-5)


def test_explicit_blocked_falls_back_to_xla_for_masks_and_causal():
    q, k, v = _qkv(32, 32)
    mask = jnp.asarray(np.random.default_rng(2).random((2, 2, 32, 32)) > 0.3)
    mask = mask.at[..., 0].set(True)  # every query attends to something
    got = dot_product_attention(q, k, v, mask_BNTS=mask, implementation="blocked")
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    got = dot_product_attention(q, k, v, is_causal=True, implementation="blocked")
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not _uses_scan(lambda *a: dot_product_attention(*a, is_causal=True,
                                                           implementation="blocked"), q, k, v)
