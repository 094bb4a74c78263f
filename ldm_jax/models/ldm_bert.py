"""LDMBert: the BERT-like text transformer trained jointly with the LDM text-to-image 1.45B model.

Mirrors diffusers' `LDMBertModel` (pipelines/latent_diffusion/pipeline_latent_diffusion.py), the
port of CompVis' `BERTEmbedder` (an x-transformers Encoder): token + learned position embeddings,
pre-LayerNorm blocks (LayerNorm eps 1e-5) with bidirectional multi-head self-attention (q/k/v
without bias, output projection with bias, softmax(q k^T / sqrt(head_dim))), an fc1/GELU(erf)/fc2
MLP, and a final LayerNorm. The checkpoint also holds a `to_logits` head (width -> vocab) that the
conditioning path never uses; it is kept so that loading and exporting are lossless.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.attention import MultiHeadAttention
from ldm_jax.models.clip_text import check_token_ids, padding_mask_BNTS
from ldm_jax.models.layers import ACTIVATIONS, Dtype, LayerNorm, dense, embedding


@dataclasses.dataclass(frozen=True)
class LDMBertConfig:
    """Hyper-parameters (diffusers LDMBertConfig field names in comments)."""

    vocab_size: int = 30522
    max_length: int = 77  # max_position_embeddings
    width: int = 1280  # d_model
    num_layers: int = 32  # encoder_layers
    num_heads: int = 8  # encoder_attention_heads
    head_dim: int = 64
    mlp_dim: int = 5120  # encoder_ffn_dim
    activation: str = "gelu"  # activation_function ("gelu" is the exact erf GELU)
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default; not configurable in diffusers
    dropout: float = 0.0  # embedding and residual-branch dropout (diffusers `dropout`)
    logits_head: bool = True  # whether the (unused) `to_logits` head has parameters

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; allowed: {sorted(ACTIVATIONS)}"
            )


class LDMBertLayer(nn.Module):
    """x + drop(attn(ln1(x))), then x + drop(fc2(act(fc1(ln2(x))))) — LDMBertEncoderLayer."""

    config: LDMBertConfig
    dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x_BTC, mask_BNTS=None, *, deterministic: bool = True):
        cfg = self.config

        def drop(y):
            return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)

        attn = MultiHeadAttention(
            cfg.num_heads,
            cfg.head_dim,
            out_features=cfg.width,
            qkv_bias=False,
            out_bias=True,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            name="attn",
        )
        y = LayerNorm(cfg.layer_norm_eps, self.dtype, name="norm1")(x_BTC)
        x_BTC = x_BTC + drop(attn(y, mask_BNTS=mask_BNTS))
        y = LayerNorm(cfg.layer_norm_eps, self.dtype, name="norm2")(x_BTC)
        y = ACTIVATIONS[cfg.activation](dense(cfg.mlp_dim, name="fc1", dtype=self.dtype)(y))
        return x_BTC + drop(dense(cfg.width, name="fc2", dtype=self.dtype)(y))


class LDMBert(nn.Module):
    """ids [B, T] -> last hidden state [B, T, width] (and logits [B, T, vocab] on request).

    `attention_mask_BT` (optional, 1 = real token) hides padded keys as diffusers does; the LDM
    text-to-image pipeline never passes one.
    """

    config: LDMBertConfig
    dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(
        self,
        input_ids_BT,
        *,
        attention_mask_BT=None,
        deterministic: bool = True,
        return_logits: bool = False,
    ):
        cfg = self.config
        check_token_ids(
            input_ids_BT, vocab_size=cfg.vocab_size, max_length=cfg.max_length, model="LDMBert"
        )
        if return_logits and not cfg.logits_head:
            raise ValueError("return_logits=True needs a config with logits_head=True")
        input_ids_BT = jnp.asarray(input_ids_BT)
        batch, tokens = input_ids_BT.shape
        mask_BNTS = padding_mask_BNTS(attention_mask_BT, batch, tokens)

        x_BTC = embedding(cfg.vocab_size, cfg.width, name="token_embedding")(input_ids_BT)
        x_BTC = (
            x_BTC
            + embedding(cfg.max_length, cfg.width, name="position_embedding")(jnp.arange(tokens))[
                None
            ]
        )
        x_BTC = nn.Dropout(cfg.dropout)(x_BTC.astype(self.dtype), deterministic=deterministic)
        for i in range(cfg.num_layers):
            layer = LDMBertLayer(cfg, self.dtype, self.attention_implementation, name=f"layers_{i}")
            x_BTC = layer(x_BTC, mask_BNTS, deterministic=deterministic)
        hidden_BTC = LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_norm")(x_BTC)

        # The head's parameters must exist after init even though conditioning never uses it.
        if cfg.logits_head and (return_logits or self.is_initializing()):
            logits_BTV = dense(cfg.vocab_size, name="to_logits", dtype=self.dtype)(hidden_BTC)
            if return_logits:
                return hidden_BTC, logits_BTV
        return hidden_BTC
