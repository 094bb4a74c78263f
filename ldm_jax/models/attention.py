"""The one attention entry point of ldm_jax, and the attention blocks built on it.

Every network (UNet, autoencoder, text encoders) computes attention through
`dot_product_attention`; with `implementation=None` (the default everywhere) the kernel is chosen
per call by backend, dtype and shape (attention_dispatch.py): cuDNN flash attention on NVIDIA GPUs
in bf16/fp16, Pallas splash attention on TPU, flash-style blocked attention in plain XLA wherever
the logits would be large, XLA's one-pass attention for the small rest. Networks, the pipeline and
the train steps pass an explicit name through only when a config key / CLI flag asks for one.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention_dispatch import (
    IMPLEMENTATIONS,
    AttentionShape,
    choose_attention,
    cudnn_rejection,
)
from ldm_jax.models.backend import target_backend
from ldm_jax.models.blocked_attention import blocked_attention
from ldm_jax.models.layers import Dtype, GroupNorm, LayerNorm, dense, gelu

# Names accepted by `implementation` (None = choose per call).
ATTENTION_IMPLEMENTATIONS = (None, *IMPLEMENTATIONS)
# cuDNN's fused kernel refuses to differentiate odd sequence lengths ("Unsupported sequence length
# Q 1024, KV 77" on an H200, jax 0.11.2: SD's 77-token text context); sequences are padded to a
# multiple of this and the padding masked by length (key_value_seq_lengths: no bias, so the
# backward pass stays the fused one). 77 keys -> 80.
CUDNN_SEQUENCE_MULTIPLE = 8


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

    `implementation`: None chooses (attention_dispatch.choose_attention); "xla", "cudnn",
    "blocked" or "splash" force one. A mask or causal attention always runs on "xla" or "cudnn"
    (the tiled paths take no mask). An explicit "cudnn" for a shape cuDNN cannot take is an error
    that says why. The XLA and blocked paths form logits and softmax in fp32 whatever the input
    dtype. `upcast=True` additionally casts q and k to fp32 before the product on the XLA and
    splash paths (CompVis' ATTN_PRECISION "fp32", which keeps fp16 SD2 models from overflowing;
    cuDNN and blocked accumulate in fp32 anyway). `mask_BNTS` is boolean, True = attend.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"allowed: {ATTENTION_IMPLEMENTATIONS}"
        )
    masked = mask_BNTS is not None or is_causal
    if implementation is None:
        shape = AttentionShape.of(q_BTNH, k_BSNH, masked=masked)
        implementation = choose_attention(shape, target_backend(), _compute_capability())
    elif masked and implementation in ("blocked", "splash"):
        implementation = "xla"
    out_dtype = v_BSNH.dtype
    if implementation == "blocked":
        return blocked_attention(q_BTNH, k_BSNH, v_BSNH)
    if implementation == "cudnn":
        return cudnn_attention(q_BTNH, k_BSNH, v_BSNH, mask_BNTS=mask_BNTS, is_causal=is_causal)
    if upcast:
        q_BTNH, k_BSNH, v_BSNH = (t.astype(jnp.float32) for t in (q_BTNH, k_BSNH, v_BSNH))
    if implementation == "splash":
        from ldm_jax.models.splash_attention import splash_attention  # Pallas: only when asked

        return splash_attention(q_BTNH, k_BSNH, v_BSNH).astype(out_dtype)
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, mask=mask_BNTS, is_causal=is_causal, implementation="xla"
    )
    return out_BTNH.astype(out_dtype)


def cudnn_attention(
    q_BTNH: jax.Array,
    k_BSNH: jax.Array,
    v_BSNH: jax.Array,
    *,
    mask_BNTS: jax.Array | None = None,
    is_causal: bool = False,
    kernel: str = "cudnn",
) -> jax.Array:
    """cuDNN flash attention with both sequences padded to CUDNN_SEQUENCE_MULTIPLE and the padding
    masked through `query_seq_lengths` / `key_value_seq_lengths`. The head_dim and dtype limits are
    checked first. `kernel` is the `jax.nn.dot_product_attention` implementation ("xla" runs the
    same padding on a CPU, for tests)."""
    if kernel == "cudnn":
        shape = AttentionShape.of(q_BTNH, k_BSNH, masked=mask_BNTS is not None or is_causal)
        reason = cudnn_rejection(shape, _compute_capability())
        if reason:
            raise ValueError(f'attention implementation "cudnn": {reason}; use None to choose '
                             "a kernel that takes this shape")
    if mask_BNTS is not None:  # an explicit mask is a bias for cuDNN: no padding needed
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_BNTS,
                                            is_causal=is_causal, implementation=kernel)
    b, t = q_BTNH.shape[:2]
    s = k_BSNH.shape[1]

    def pad(x, length):
        extra = math.ceil(length / CUDNN_SEQUENCE_MULTIPLE) * CUDNN_SEQUENCE_MULTIPLE - length
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x

    out_BTNH = jax.nn.dot_product_attention(
        pad(q_BTNH, t),
        pad(k_BSNH, s),
        pad(v_BSNH, s),
        is_causal=is_causal,
        query_seq_lengths=jnp.full((b,), t, jnp.int32),
        key_value_seq_lengths=jnp.full((b,), s, jnp.int32),
        implementation=kernel,
    )
    return out_BTNH[:, :t]


def _compute_capability() -> str | None:
    """The default GPU's CUDA compute capability ("9.0"), None elsewhere."""
    if target_backend() != "gpu" or jax.default_backend() != "gpu":
        return None
    return getattr(jax.devices()[0], "compute_capability", None)


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
    norm_num_groups: int = 32  # CompVis: 32; diffusers: the model's norm_num_groups

    @nn.compact
    def __call__(self, x_BHWC):
        b, h, w, c = x_BHWC.shape
        head_dim = self.head_dim or c // self.num_heads
        if self.num_heads * head_dim != c:
            raise ValueError(
                f"AttentionBlock: {self.num_heads} heads x {head_dim} channels != {c} channels"
            )
        y = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, name="norm")(x_BHWC)
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
    norm_num_groups: int = 32  # CompVis: 32; diffusers: the UNet's norm_num_groups

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
        y = GroupNorm(self.norm_num_groups, 1e-6, self.dtype, name="norm")(x_BHWC)
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
