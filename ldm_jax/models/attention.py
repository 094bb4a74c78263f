"""The one attention entry point of ldm_jax, and the attention blocks built on it.

Every network (UNet, autoencoder, text encoders) computes attention through
`dot_product_attention`, so a faster kernel (cuDNN flash attention, a Pallas/splash kernel on TPU)
is a change in one place, selected by the `implementation` argument that the blocks pass through.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.blocked_attention import block_sizes, blocked_attention
from ldm_jax.models.layers import Dtype, GroupNorm, LayerNorm, dense, gelu

# Names accepted by `implementation`: None picks (below), "xla" is the portable reference path,
# "cudnn" the fused GPU kernel (bf16/fp16 only), "blocked" flash-style tiles in plain XLA
# (blocked_attention.py; unmasked attention only, else XLA).
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "blocked")
# None on a CPU backend: "blocked" from this many queries on (SD's 32x32 and 64x64 levels, self-
# and cross-attention: 5.5x faster at 4096 x 4096 tokens, 1.9x at 4096 x 77 keys, 1.3x at 1024 x
# 77); shorter sequences keep XLA's one-pass attention (at 256 tokens the two are within 10%)
BLOCKED_MIN_QUERIES_ON_CPU = 1024


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSNH: jax.Array,
    v_BSNH: jax.Array,
    *,
    mask_BNTS: jax.Array | None = None,
    is_causal: bool = False,
    upcast: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v for [batch, tokens, heads, head_dim] inputs.

    The XLA and blocked paths form the logits and the softmax in fp32 whatever the input dtype.
    None means "blocked" on a CPU backend for long unmasked sequences (>= 1024 queries), else
    JAX's choice.
    "cudnn" falls back to XLA for an odd number of keys (a text context of 77 tokens), which
    cuDNN's fused kernel cannot differentiate.
    `upcast=True` additionally casts q and k to fp32 before the product (CompVis' ATTN_PRECISION
    "fp32", which keeps fp16 SD2 models from overflowing). `mask_BNTS` is boolean, True = attend.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"allowed: {ATTENTION_IMPLEMENTATIONS}"
        )
    out_dtype = v_BSNH.dtype
    if implementation in (None, "blocked") and mask_BNTS is None and not is_causal:
        blocks = block_sizes(q_BTNH.shape[1], k_BSNH.shape[1])
        long_on_cpu = (jax.default_backend() == "cpu"
                       and q_BTNH.shape[1] >= BLOCKED_MIN_QUERIES_ON_CPU)
        if blocks is not None and (implementation == "blocked" or long_on_cpu):
            return blocked_attention(q_BTNH, k_BSNH, v_BSNH, q_block=blocks[0], k_block=blocks[1])
    if implementation == "blocked":  # masked, causal or not divisible into blocks
        implementation = "xla"
    if implementation == "cudnn" and k_BSNH.shape[1] % 2:
        # jax's cuDNN path refuses to differentiate odd key lengths ("Unsupported sequence
        # length Q 1024, KV 77" on an H200, jax 0.11.2: SD's 77-token cross-attention).
        # Those logits are small ([B, N, T, 77]); the large self-attention still uses cuDNN.
        implementation = "xla"
    if upcast and implementation != "cudnn":
        q_BTNH, k_BSNH, v_BSNH = (t.astype(jnp.float32) for t in (q_BTNH, k_BSNH, v_BSNH))
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH,
        k_BSNH,
        v_BSNH,
        mask=mask_BNTS,
        is_causal=is_causal,
        implementation=implementation,
    )
    return out_BTNH.astype(out_dtype)


class MultiHeadAttention(nn.Module):
    """Projections q/k/v/out around `dot_product_attention`; self-attention when context is None."""

    num_heads: int
    head_dim: int
    out_features: int | None = None  # defaults to the query width
    qkv_bias: bool = False
    out_bias: bool = True
    upcast: bool = False
    implementation: str | None = None
    zero_init_out: bool = False  # CompVis zero_module on the output projection
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTC, context_BSD=None, *, mask_BNTS=None, is_causal=False):
        context_BSD = x_BTC if context_BSD is None else context_BSD
        inner = self.num_heads * self.head_dim
        heads = (self.num_heads, self.head_dim)

        def project(name, inputs):
            y = dense(inner, name=name, dtype=self.dtype, use_bias=self.qkv_bias)(inputs)
            return y.reshape(*y.shape[:-1], *heads)

        out_BTNH = dot_product_attention(
            project("q", x_BTC),
            project("k", context_BSD),
            project("v", context_BSD),
            mask_BNTS=mask_BNTS,
            is_causal=is_causal,
            upcast=self.upcast,
            implementation=self.implementation,
        )
        out_BTI = out_BTNH.reshape(*out_BTNH.shape[:-2], inner)
        out_features = self.out_features or x_BTC.shape[-1]
        out = dense(
            out_features,
            name="out",
            dtype=self.dtype,
            use_bias=self.out_bias,
            zero_init=self.zero_init_out,
        )
        return out(out_BTI)


class AttentionBlock(nn.Module):
    """Residual self-attention over the pixels of a feature map (no conditioning).

    CompVis' AttnBlock in the autoencoder (one head, GroupNorm eps 1e-6) and openaimodel's
    AttentionBlock in unconditional UNets (several heads, eps 1e-5). Its q/k/v/out are 1x1 convs
    in PyTorch, i.e. dense layers over the channel axis here.
    """

    num_heads: int = 1
    head_dim: int | None = None  # None: channels // num_heads
    norm_eps: float = 1e-6
    upcast: bool = False
    implementation: str | None = None
    zero_init_out: bool = False  # openaimodel zero-initialises proj_out; the autoencoder does not
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        b, h, w, c = x_BHWC.shape
        head_dim = self.head_dim or c // self.num_heads
        if self.num_heads * head_dim != c:
            raise ValueError(
                f"AttentionBlock: {self.num_heads} heads x {head_dim} channels != {c} channels"
            )
        y = GroupNorm(32, self.norm_eps, self.dtype, name="norm")(x_BHWC)
        y_BTC = MultiHeadAttention(
            self.num_heads,
            head_dim,
            qkv_bias=True,
            upcast=self.upcast,
            implementation=self.implementation,
            zero_init_out=self.zero_init_out,
            dtype=self.dtype,
            name="attn",
        )(y.reshape(b, h * w, c))
        return x_BHWC + y_BTC.reshape(b, h, w, c)


class FeedForwardGEGLU(nn.Module):
    """Linear(dim, 2 * inner) -> a * gelu(gate) -> dropout -> Linear(inner, dim)."""

    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        dim = x.shape[-1]
        inner = dim * self.mult
        a, gate = jnp.split(dense(2 * inner, name="proj_in", dtype=self.dtype)(x), 2, axis=-1)
        y = a * gelu(gate)
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        return dense(dim, name="proj_out", dtype=self.dtype)(y)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual.

    With `disable_self_attn` the first attention attends to the context too (CompVis
    disable_self_attentions / diffusers only_cross_attention).
    """

    num_heads: int
    head_dim: int
    dropout: float = 0.0
    disable_self_attn: bool = False
    upcast: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTC, context_BSD=None, *, deterministic: bool = True):
        def attention(name):
            return MultiHeadAttention(
                self.num_heads,
                self.head_dim,
                upcast=self.upcast,
                implementation=self.implementation,
                dtype=self.dtype,
                name=name,
            )

        def drop(y):
            return nn.Dropout(self.dropout)(y, deterministic=deterministic)

        def norm(name):
            return LayerNorm(1e-5, self.dtype, name=name)

        attn1_context = context_BSD if self.disable_self_attn else None
        x_BTC = x_BTC + drop(attention("attn1")(norm("norm1")(x_BTC), attn1_context))
        x_BTC = x_BTC + drop(attention("attn2")(norm("norm2")(x_BTC), context_BSD))
        ff = FeedForwardGEGLU(dropout=self.dropout, dtype=self.dtype, name="ff")
        return x_BTC + ff(norm("norm3")(x_BTC), deterministic=deterministic)


class SpatialTransformer(nn.Module):
    """CompVis SpatialTransformer (diffusers Transformer2DModel): cross-attention to a context.

    proj_in/proj_out are 1x1 convs in SD1 checkpoints and linear layers in SD2 ones; on NHWC data
    both are the same dense layer over channels, so the difference lives only in the key tables.
    """

    num_heads: int
    head_dim: int
    depth: int = 1
    dropout: float = 0.0
    context_dim: int | None = None
    disable_self_attn: bool = False
    upcast: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC, context_BSD=None, *, deterministic: bool = True):
        b, h, w, c = x_BHWC.shape
        if context_BSD is not None and self.context_dim is not None:
            if context_BSD.shape[-1] != self.context_dim:
                raise ValueError(
                    f"context width {context_BSD.shape[-1]} != context_dim {self.context_dim} "
                    "that this network was built for"
                )
        inner = self.num_heads * self.head_dim
        y = GroupNorm(32, 1e-6, self.dtype, name="norm")(x_BHWC)
        y_BTI = dense(inner, name="proj_in", dtype=self.dtype)(y.reshape(b, h * w, c))
        for i in range(self.depth):
            y_BTI = BasicTransformerBlock(
                self.num_heads,
                self.head_dim,
                dropout=self.dropout,
                disable_self_attn=self.disable_self_attn,
                upcast=self.upcast,
                implementation=self.implementation,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(y_BTI, context_BSD, deterministic=deterministic)
        # zero-initialised as CompVis does: the block starts as the identity when trained
        y_BTC = dense(c, name="proj_out", dtype=self.dtype, zero_init=True)(y_BTI)
        return x_BHWC + y_BTC.reshape(b, h, w, c)
