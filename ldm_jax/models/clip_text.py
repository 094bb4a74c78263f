"""The CLIP / OpenCLIP text transformer that conditions Stable Diffusion 1.x and 2.x.

Mirrors transformers' `CLIPTextModel` (models/clip/modeling_clip.py): token + learned position
embeddings, pre-LayerNorm blocks with causal self-attention and an fc1/act/fc2 MLP, a final
LayerNorm, and the pooled output at the end-of-text token. SD 1.x uses OpenAI's ViT-L/14 text tower
(quick-GELU); SD 2.x uses OpenCLIP ViT-H/14 (GELU) and, like CompVis'
`FrozenOpenCLIPEmbedder(layer="penultimate")`, reads the final LayerNorm of the penultimate block's
output, which `skip_last_layers=1` reproduces. SDXL reads the penultimate block's output of both
its encoders WITHOUT the final LayerNorm (`final_norm_on_output=False`; SGM FrozenCLIPEmbedder
layer="hidden" and FrozenOpenCLIPEmbedder2 legacy=False, diffusers `hidden_states[-2]`), and its
OpenCLIP ViT-bigG/14 adds transformers' `CLIPTextModelWithProjection` head (`projection_dim`).
"""

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.attention import MultiHeadAttention
from ldm_jax.models.layers import ACTIVATIONS, Dtype, LayerNorm, dense, embedding

# HF CLIP configs written before transformers PR #24773 carry eos_token_id=2, and for them the
# pooled token is the argmax of the ids (the end-of-text token has the largest id). The SD 1.x/2.x
# text-encoder configs are of that kind, so 2 is the default here too.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of a CLIP text transformer (field names of HF's config in comments)."""

    vocab_size: int = 49408
    max_length: int = 77  # max_position_embeddings
    width: int = 768  # hidden_size
    num_layers: int = 12  # num_hidden_layers
    num_heads: int = 12  # num_attention_heads
    mlp_dim: int = 3072  # intermediate_size
    activation: str = "quick_gelu"  # hidden_act
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    # Default output = final_layer_norm(hidden_states[-1 - skip_last_layers]) (HF numbering, where
    # hidden_states[0] is the embedding output); the skipped blocks are not computed.
    skip_last_layers: int = 0
    # False: the output is hidden_states[-1 - skip_last_layers] as is (SDXL's encoders)
    final_norm_on_output: bool = True
    # CLIPTextModelWithProjection: text_embeds = text_projection (no bias) of the LAST layer's
    # final-LayerNorm output at the end-of-text token, whatever skip_last_layers selects
    projection_dim: int | None = None
    # CLIP's text tower is causal. A text encoder trained from scratch with the UNet (the built-in
    # default) may see the whole caption from every token instead, like the paper's BERT-like
    # encoder: then "red" already knows whether it is "above" or "below" something.
    causal: bool = True

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; allowed: {sorted(ACTIVATIONS)}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        _check_skip(self.skip_last_layers, self.num_layers)
        dim = self.projection_dim
        if dim is not None and (type(dim) is not int or dim < 1):
            raise ValueError(f"projection_dim must be None or an int >= 1; got {dim!r}")


@flax.struct.dataclass
class CLIPTextOutput:
    # [B, T, width]: the selected layer, after the final LayerNorm unless final_norm_on_output=False
    last_hidden_state: jax.Array
    # [B, width]: final_norm(selected layer) at the end-of-text token, so with skip_last_layers
    # > 0 it is pooled from the selected layer (as a truncated diffusers SD2 encoder pools).
    pooled: jax.Array
    # [B, projection_dim] when the config has a projection (HF text_embeds), else None
    text_embeds: jax.Array | None = None


def _check_skip(skip: int, num_layers: int) -> None:
    if not 0 <= skip <= num_layers:
        raise ValueError(f"skip_last_layers must be in [0, {num_layers}]; got {skip}")


def check_token_ids(input_ids_BT, *, vocab_size: int, max_length: int, model: str) -> None:
    """ValueError unless ids are an integer [batch, tokens] array that the model can embed.

    The vocabulary range is checked only for concrete arrays (under jit the values are unknown).
    """
    shape = np.shape(input_ids_BT)
    if len(shape) != 2:
        raise ValueError(f"{model} takes token ids shaped [batch, tokens]; got shape {shape}")
    dtype = jnp.asarray(input_ids_BT).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{model} takes integer token ids; got dtype {dtype}")
    if shape[1] > max_length:
        raise ValueError(
            f"{model} takes at most {max_length} tokens (max_position_embeddings); got {shape[1]}"
        )
    if shape[1] == 0:
        raise ValueError(f"{model} needs at least one token")
    try:
        ids = np.asarray(input_ids_BT)
    except jax.errors.TracerArrayConversionError:  # traced under jit: values unknown
        return
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(
            f"{model} token ids must lie in [0, {vocab_size - 1}] (vocab_size {vocab_size}); "
            f"got values in [{ids.min()}, {ids.max()}]"
        )


def padding_mask_BNTS(attention_mask_BT, batch: int, tokens: int):
    """[B, T] padding mask (1/True = real token) -> boolean key mask [B, 1, 1, T], or None."""
    if attention_mask_BT is None:
        return None
    if np.shape(attention_mask_BT) != (batch, tokens):
        raise ValueError(
            f"attention_mask must be shaped like the ids {(batch, tokens)}; "
            f"got {np.shape(attention_mask_BT)}"
        )
    return jnp.asarray(attention_mask_BT).astype(bool)[:, None, None, :]


class CLIPEncoderLayer(nn.Module):
    """x + attn(ln1(x)) (causal unless configured), then x + fc2(act(fc1(ln2(x)))) — HF
    CLIPEncoderLayer."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x_BTC, mask_BNTS=None):
        cfg = self.config
        attn = MultiHeadAttention(
            cfg.num_heads,
            cfg.width // cfg.num_heads,
            qkv_bias=True,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            name="attn",
        )
        y = LayerNorm(cfg.layer_norm_eps, self.dtype, name="norm1")(x_BTC)
        x_BTC = x_BTC + attn(y, mask_BNTS=mask_BNTS, is_causal=cfg.causal)
        y = LayerNorm(cfg.layer_norm_eps, self.dtype, name="norm2")(x_BTC)
        y = dense(cfg.mlp_dim, name="fc1", dtype=self.dtype)(y)
        y = ACTIVATIONS[cfg.activation](y)
        return x_BTC + dense(cfg.width, name="fc2", dtype=self.dtype)(y)


class CLIPTextTransformer(nn.Module):
    """CLIP text encoder: ids [B, T] -> CLIPTextOutput (transformers CLIPTextModel semantics).

    `attention_mask_BT` (optional, 1 = real token) additionally hides padded keys, as HF does when
    a mask is passed; Stable Diffusion never passes one. `skip_last_layers` overrides the config.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(
        self, input_ids_BT, *, attention_mask_BT=None, skip_last_layers=None,
        extra_skip_layers=None,
    ):  # fmt: skip
        cfg = self.config
        check_token_ids(
            input_ids_BT, vocab_size=cfg.vocab_size, max_length=cfg.max_length, model="CLIP text"
        )
        skip = cfg.skip_last_layers if skip_last_layers is None else skip_last_layers
        _check_skip(skip, cfg.num_layers)
        input_ids_BT = jnp.asarray(input_ids_BT)
        batch, tokens = input_ids_BT.shape
        mask_BNTS = padding_mask_BNTS(attention_mask_BT, batch, tokens)

        token_emb = embedding(cfg.vocab_size, cfg.width, name="token_embedding")
        position_emb = embedding(cfg.max_length, cfg.width, name="position_embedding")
        x_BTC = token_emb(input_ids_BT) + position_emb(jnp.arange(tokens))[None]
        x_BTC = x_BTC.astype(self.dtype)

        # Run blocks up to `stop` (all of them for the projection, which reads the last one);
        # initialisation must still create every block's parameters.
        stop = cfg.num_layers - skip
        every = self.is_initializing() or cfg.projection_dim is not None
        selected_BTC = x_BTC  # hidden_states[0] when every block is skipped
        hidden_LBTC = [x_BTC]
        for i in range(cfg.num_layers if every else stop):
            layer = CLIPEncoderLayer(
                cfg, self.dtype, self.attention_implementation, name=f"layers_{i}"
            )
            x_BTC = layer(x_BTC, mask_BNTS)
            if i + 1 <= stop:
                hidden_LBTC.append(x_BTC)
            if i + 1 == stop:
                selected_BTC = x_BTC
        if extra_skip_layers is not None:  # a traced count (diffusers' clip_skip): no recompile
            index = stop - jnp.clip(jnp.asarray(extra_skip_layers, jnp.int32), 0, stop)
            selected_BTC = jnp.stack(hidden_LBTC)[index]

        final_norm = LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_norm")
        normed_BTC = final_norm(selected_BTC)
        pooled_BC = pool_at_eos(normed_BTC, input_ids_BT, cfg.eos_token_id)
        text_embeds = None
        if cfg.projection_dim is not None:
            reads_last = stop == cfg.num_layers and extra_skip_layers is None
            last_BTC = normed_BTC if reads_last else final_norm(x_BTC)
            last_BC = pool_at_eos(last_BTC, input_ids_BT, cfg.eos_token_id)
            projection = dense(
                cfg.projection_dim, name="text_projection", dtype=self.dtype, use_bias=False
            )
            text_embeds = projection(last_BC)
        hidden_BTC = normed_BTC if cfg.final_norm_on_output else selected_BTC
        return CLIPTextOutput(hidden_BTC, pooled_BC, text_embeds)


def pool_at_eos(hidden_BTC, input_ids_BT, eos_token_id: int):
    """The hidden state at the end-of-text token, exactly as HF CLIPTextModel picks it."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        index_B = jnp.argmax(input_ids_BT, axis=-1)
    else:  # first occurrence of the EOS id (padding may reuse it); 0 when absent, as in HF
        index_B = jnp.argmax((input_ids_BT == eos_token_id).astype(jnp.int32), axis=-1)
    return hidden_BTC[jnp.arange(hidden_BTC.shape[0]), index_B]
