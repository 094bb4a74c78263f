"""What training and sampling share about a latent diffusion model, written once.

The train step (ldm_jax/training/ldm_step.py) and the sampling pipeline (ldm_jax/sampling/) both
build the noise schedule of a spec, encode the condition with the cond stage, and assemble the
UNet's input (latents concatenated with spatial inputs, cross-attention context, class vector).
What only one side does stays there: conditioning dropout and stop_gradient in the train step,
classifier-free guidance and the concatenated inputs built from images and masks in sampling.

    c = unet_conditioning(spec.diffusion.conditioning_key,
                          encoded=encode_condition(spec.cond_stage, cond_module, params, tokens))
    eps = apply_unet(unet, params["unet"], x_t, t_B, c)
"""

from typing import Any, NamedTuple

import jax.numpy as jnp

from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.spec import CLIP_TEXT_CONDITIONINGS, CondStageSpec, DiffusionSpec


def schedule_from_spec(diffusion: DiffusionSpec):
    """The fp32 noise schedule (betas, alphas_cumprod, ...) that a DiffusionSpec describes."""
    return make_schedule(
        diffusion.beta_schedule,
        diffusion.num_timesteps,
        diffusion.linear_start,
        diffusion.linear_end,
    )


def encode_condition(cond_stage: CondStageSpec, cond_module, cond_params, inputs, clip_skip=None):
    """The cond stage's conditioning: tokens [B, T] -> context [B, T, D] (text), class labels [B]
    -> [B, 1, D] (class embedder), a spatial map [B, H, W, C] -> rescaled (spatial rescaler).

    ``clip_skip`` (CLIP towers; may be traced): read the output that many layers earlier."""
    kwargs = {}
    if clip_skip is not None and cond_stage.kind in CLIP_TEXT_CONDITIONINGS:
        kwargs["extra_skip_layers"] = clip_skip
    out = cond_module.apply({"params": cond_params}, inputs, **kwargs)
    # CLIP towers return an encoder output (the context is its last_hidden_state); LDM-BERT, the
    # class embedder and the spatial rescaler return the conditioning array itself
    return out.last_hidden_state if cond_stage.kind in CLIP_TEXT_CONDITIONINGS else out


class UNetConditioning(NamedTuple):
    """The UNet's conditioning inputs (a pytree: None fields are absent)."""

    context: Any = None  # cross-attention context [B, L, D]
    y: Any = None  # class labels [B] or adm vector [B, D] (conditioning_key "adm")
    concat: Any = None  # spatial inputs [B, h, w, c'] concatenated to x_t along channels


def unet_conditioning(
    conditioning_key: str | None, *, encoded=None, concat=None, labels=None
) -> UNetConditioning:
    """Route the condition to the UNet input its conditioning key names (CompVis DiffusionWrapper).

    "crossattn": `encoded` is the context; "concat": `concat` is concatenated to x_t; "hybrid":
    both; "adm": `encoded` (or the raw `labels` when nothing encodes them) is the class vector y.
    """
    if conditioning_key == "adm":
        return UNetConditioning(y=encoded if encoded is not None else labels)
    context = encoded if conditioning_key in ("crossattn", "hybrid") else None
    concat = concat if conditioning_key in ("concat", "hybrid") else None
    return UNetConditioning(context=context, concat=concat)


def apply_unet(unet, unet_params, x_t_BHWC, t_B, c: UNetConditioning, **kwargs):
    """The UNet on [x_t, c.concat] (channels) with c.context and c.y; kwargs go to `apply`
    (deterministic=False, rngs=... in training)."""
    if c.concat is not None:
        x_t_BHWC = jnp.concatenate([x_t_BHWC, c.concat.astype(x_t_BHWC.dtype)], axis=-1)
    return unet.apply({"params": unet_params}, x_t_BHWC, t_B, c.context, c.y, **kwargs)
