"""Which kernel `dot_product_attention` runs (the pure rule, no GPU/TPU needed), and the cuDNN
path's padding of odd sequence lengths checked on CPU with XLA standing in for the kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import attention
from ldm_jax.models.attention import cudnn_attention, dot_product_attention
from ldm_jax.models.attention_dispatch import (
    MAX_MATERIALISED_LOGITS_BYTES,
    AttentionShape,
    choose_attention,
)

BF16, F32 = "bfloat16", "float32"


def shape(queries=4096, keys=4096, head_dim=40, dtype=BF16, batch=16, heads=8, masked=False):
    return AttentionShape(batch, queries, keys, heads, head_dim, dtype, masked)


@pytest.mark.parametrize(("case", "backend", "capability", "expected"), [
    (shape(), "gpu", "9.0", "cudnn"),  # SD 1.5 64x64 self-attention, bf16, H100/H200
    (shape(keys=77), "gpu", "9.0", "cudnn"),  # its cross-attention (padded to 80 keys)
    (shape(head_dim=160, queries=64, keys=77), "gpu", "9.0", "cudnn"),  # 8x8 level, Hopper
    (shape(head_dim=160, queries=64, keys=77), "gpu", "8.0", "xla"),  # A100: > 128, small logits
    (shape(head_dim=160, queries=4096), "gpu", "8.0", "blocked"),  # ... large logits
    (shape(head_dim=20), "gpu", "9.0", "blocked"),  # not a multiple of 8
    (shape(dtype="float16"), "gpu", "7.5", "cudnn"),  # T4 fp16
    (shape(dtype=F32), "gpu", "9.0", "blocked"),  # fp32 never goes to cuDNN
    (shape(dtype=F32, queries=256, keys=256, batch=2), "gpu", "9.0", "xla"),
    (shape(), "gpu", None, "blocked"),  # a GPU without a CUDA compute capability (ROCm)
    (shape(), "tpu", None, "splash"),
    (shape(keys=77, dtype=F32), "tpu", None, "splash"),
    (shape(masked=True), "tpu", None, "xla"),  # text encoders: causal, 77 tokens
    (shape(masked=True), "gpu", "9.0", "xla"),
    (shape(queries=1024, keys=77, dtype=F32, batch=2), "cpu", None, "blocked"),
    (shape(queries=256, keys=256, dtype=F32, batch=2), "cpu", None, "xla"),
    (shape(queries=256, keys=256, dtype=F32, batch=512), "cpu", None, "blocked"),  # 1 GiB
    (shape(), "metal", None, "blocked"),  # unknown backend: large -> tiles
    (shape(queries=64, keys=77), "metal", None, "xla"),
])
def test_choice(case, backend, capability, expected):
    assert choose_attention(case, backend, capability) == expected


def test_default_never_materialises_large_logits():
    """Whatever the backend, an unmasked shape whose fp32 logits exceed the limit gets a tiled or
    fused kernel."""
    big = shape(dtype=F32, queries=2048, keys=2048, batch=4)
    assert big.logits_bytes > MAX_MATERIALISED_LOGITS_BYTES
    for backend, capability in [("gpu", "9.0"), ("gpu", "8.0"), ("tpu", None), ("cpu", None),
                                ("other", None)]:
        assert choose_attention(big, backend, capability) != "xla"


def _qkv(t, s, dim=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, t, 2, dim)) * 2
    k = rng.standard_normal((2, s, 2, dim)) * 2
    v = rng.standard_normal((2, s, 2, dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@pytest.mark.parametrize(("t", "s"), [(64, 77), (63, 77), (64, 64)])
def test_cudnn_padding_keeps_values_and_gradients(t, s):
    """The cuDNN path pads both sequences to a multiple of 8 and masks the padding by length;
    run with XLA standing in for the kernel, values and q/k/v gradients equal unpadded attention."""
    q, k, v = _qkv(t, s)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    def padded(q, k, v):
        return cudnn_attention(q, k, v, kernel="xla")

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    np.testing.assert_allclose(padded(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-6)
    got = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert float(jnp.abs(g - w).max() / jnp.abs(w).max()) <= 1e-5


def test_cudnn_call_is_padded_and_masked_by_length(monkeypatch):
    """What reaches JAX's cuDNN kernel for SD's cross-attention: 80 keys, lengths, no bias."""
    calls = []

    def fake(q, k, v, *, is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
             implementation=None, **rest):
        calls.append(dict(q=q.shape, k=k.shape, q_len=query_seq_lengths,
                          kv_len=key_value_seq_lengths, impl=implementation, rest=rest))
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(attention, "_compute_capability", lambda: "9.0")
    q, k, v = _qkv(64, 77, dtype=jnp.bfloat16)
    out = dot_product_attention(q, k, v, implementation="cudnn")
    (call,) = calls
    assert call["impl"] == "cudnn" and call["q"] == (2, 64, 2, 8) and call["k"] == (2, 80, 2, 8)
    assert call["rest"] == {}  # no bias, no mask
    np.testing.assert_array_equal(call["kv_len"], [77, 77])
    np.testing.assert_array_equal(call["q_len"], [64, 64])
    assert out.shape == q.shape and out.dtype == jnp.bfloat16


@pytest.mark.parametrize(("dim", "dtype", "capability", "message"), [
    (20, jnp.bfloat16, "9.0", "multiple of 8"),
    (160, jnp.bfloat16, "8.0", "<= 128"),
    (8, jnp.float32, "9.0", "bfloat16 or float16"),
])
def test_explicit_cudnn_refuses_shapes_it_cannot_take(monkeypatch, dim, dtype, capability,
                                                      message):
    monkeypatch.setattr(attention, "_compute_capability", lambda: capability)
    q, k, v = _qkv(16, 16, dim=dim, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        dot_product_attention(q, k, v, implementation="cudnn")


def test_unknown_implementation_is_refused():
    q, k, v = _qkv(8, 8)
    with pytest.raises(ValueError, match="allowed"):
        dot_product_attention(q, k, v, implementation="flash")
