"""The Flax modules a ModelSpec describes, and their parameter shapes (without allocating them)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.clip_text import CLIPTextTransformer
from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler
from ldm_jax.models.ldm_bert import LDMBert
from ldm_jax.models.params import abstract_params
from ldm_jax.models.unet import UNet
from ldm_jax.models.vq import VQModel
from ldm_jax.spec import CLIP_TEXT_CONDITIONINGS, ModelSpec, SDXLConditionerConfig


class TextEncoders(nn.Module):
    """SDXL's text towers side by side: a tuple of ids [B, T] (one per encoder, each from its own
    tokenizer) -> a tuple of CLIPTextOutput. Params {"encoder_0": ..., "encoder_1": ...}."""

    config: SDXLConditionerConfig
    dtype: Any = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, input_ids_EBT, *, extra_skip_layers=None):
        encoders = self.config.text_encoders
        if not isinstance(input_ids_EBT, tuple | list) or len(input_ids_EBT) != len(encoders):
            raise ValueError(
                f"the SDXL conditioner takes {len(encoders)} token id arrays (one per text "
                f"encoder and tokenizer), as a tuple; got {type(input_ids_EBT).__name__}"
            )
        return tuple(
            CLIPTextTransformer(
                cfg, self.dtype, self.attention_implementation, name=f"encoder_{i}"
            )(ids_BT, extra_skip_layers=extra_skip_layers)
            for i, (cfg, ids_BT) in enumerate(zip(encoders, input_ids_EBT, strict=True))
        )


def network_modules(
    spec: ModelSpec, dtype=jnp.float32, attention: str | None = None
) -> dict[str, tuple[nn.Module, tuple]]:
    """{"first_stage" | "unet" | "cond_stage": (module, example inputs for init)}.

    `attention`: the attention implementation every network uses (None: chosen per call by
    backend, dtype and shape; models/attention_dispatch.py)."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {attention!r}; allowed: {ATTENTION_IMPLEMENTATIONS}"
        )
    fs = spec.first_stage
    fs_class = VQModel if spec.first_stage_kind == "vq" else AutoencoderKL
    fs_module = fs_class(fs, dtype=dtype, attention_implementation=attention)
    size = fs.downsample_factor
    modules = {"first_stage": (fs_module, (jnp.zeros((1, size, size, fs.in_channels)),))}
    if spec.unet is not None:
        u = spec.unet
        size = u.downsampling_factor
        x = jnp.zeros((1, size, size, u.in_channels))
        context = jnp.zeros((1, 1, u.context_dim)) if u.context_dim else None
        y = None
        if isinstance(u.num_classes, int):
            y = jnp.zeros((1,), jnp.int32)
        elif u.num_classes == "sequential":
            y = jnp.zeros((1, u.adm_in_channels))
        unet = UNet(u, dtype=dtype, attention_implementation=attention)
        modules["unet"] = (unet, (x, jnp.zeros((1,), jnp.int32), context, y))
    cond = spec.cond_stage
    if cond is not None:
        c = cond.config
        if cond.kind in CLIP_TEXT_CONDITIONINGS:
            text = CLIPTextTransformer(c, dtype=dtype, attention_implementation=attention)
            modules["cond_stage"] = (text, (_ids(c.max_length),))
        elif cond.kind == "sdxl":
            text = TextEncoders(c, dtype=dtype, attention_implementation=attention)
            ids = tuple(_ids(e.max_length) for e in c.text_encoders)
            modules["cond_stage"] = (text, (ids,))
        elif cond.kind == "ldm_bert":
            text = LDMBert(c, dtype=dtype, attention_implementation=attention)
            modules["cond_stage"] = (text, (_ids(c.max_length),))
        elif cond.kind == "class":
            modules["cond_stage"] = (ClassEmbedder(c, dtype=dtype), (jnp.zeros((1,), jnp.int32),))
        elif cond.kind == "spatial_rescaler" and c.out_channels is not None:
            x = jnp.zeros((1, 8, 8, c.in_channels))
            modules["cond_stage"] = (SpatialRescaler(c, dtype=dtype), (x,))
    return modules


def _ids(length: int):
    return jnp.zeros((1, length), jnp.int32)


def abstract_checkpoint_params(spec: ModelSpec) -> dict[str, Any]:
    """Parameter shapes of every network of `spec` (jax.ShapeDtypeStruct leaves, no memory)."""
    return {
        name: abstract_params(module, *inputs)
        for name, (module, inputs) in network_modules(spec).items()
    }
