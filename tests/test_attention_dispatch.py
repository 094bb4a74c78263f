"""Which kernel `dot_product_attention` asks JAX for (no GPU needed: JAX's function is replaced)."""

import jax
import jax.numpy as jnp
import pytest

from ldm_jax.models.attention import dot_product_attention


@pytest.fixture
def requested(monkeypatch):
    calls = []

    def fake(q, k, v, *, mask=None, is_causal=False, implementation=None):
        calls.append(implementation)
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    return calls


@pytest.mark.parametrize(
    ("keys", "asked", "expected"),
    [
        (64, "cudnn", "cudnn"),  # self-attention: cuDNN's fused kernel
        (78, "cudnn", "cudnn"),
        (77, "cudnn", "xla"),  # SD's text context: cuDNN cannot differentiate odd lengths
        (77, "xla", "xla"),
        (77, None, None),
    ],
)
def test_cudnn_falls_back_to_xla_for_odd_key_lengths(requested, keys, asked, expected):
    q = jnp.ones((1, 64, 2, 8), jnp.bfloat16)
    kv = jnp.ones((1, keys, 2, 8), jnp.bfloat16)
    out = dot_product_attention(q, kv, kv, implementation=asked)
    assert requested == [expected]
    assert out.dtype == jnp.bfloat16
