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
from ldm_jax.models.text_time import text_time_embedding
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
    -> [B, 1, D] (class embedder), a spatial map [B, H, W, C] -> rescaled (spatial rescaler),
    SDXLInputs -> (context, y) (SDXL, see `encode_sdxl_condition`).

    ``clip_skip`` (CLIP towers; may be traced): read the output that many layers earlier."""
    if cond_stage.kind == "sdxl":
        if not isinstance(inputs, SDXLInputs):
            raise TypeError(f"an SDXL cond stage takes SDXLInputs; got {type(inputs).__name__}")
        return encode_sdxl_condition(
            cond_stage, cond_module, cond_params, inputs.token_ids, inputs.time_ids,
            clip_skip=clip_skip,
        )  # fmt: skip
    kwargs = {}
    if clip_skip is not None and cond_stage.kind in CLIP_TEXT_CONDITIONINGS:
        kwargs["extra_skip_layers"] = clip_skip
    out = cond_module.apply({"params": cond_params}, inputs, **kwargs)
    # CLIP towers return an encoder output (the context is its last_hidden_state); LDM-BERT, the
    # class embedder and the spatial rescaler return the conditioning array itself
    return out.last_hidden_state if cond_stage.kind in CLIP_TEXT_CONDITIONINGS else out


class SDXLInputs(NamedTuple):
    """What SDXL's conditioner reads (a pytree): one token id array [B, T] per text encoder, each
    from its own tokenizer, and the micro-conditioning ids [B, N] (ldm_jax.models.text_time)."""

    token_ids: tuple
    time_ids: Any


def encode_sdxl_condition(
    cond_stage: CondStageSpec, cond_module, cond_params, token_ids, time_ids_BN, clip_skip=None
):
    """SDXL's (context [B, T, sum of widths], y [B, pooled + N * time_embed_dim]), as diffusers'
    encode_prompt + _get_add_time_ids + the UNet's add_embedding input (SGM GeneralConditioner's
    "crossattn" and "vector"): each encoder's selected hidden states (penultimate, no final norm)
    side by side; y = the last encoder's projected pooled embedding + Fourier features of the ids.

    ``clip_skip`` (may be traced): every encoder reads that many layers earlier (diffusers'
    hidden_states[-(clip_skip + 2)]); the pooled embedding stays the last layer's."""
    cfg = cond_stage.config
    time_ids_BN = jnp.asarray(time_ids_BN, jnp.float32)
    if time_ids_BN.ndim != 2 or time_ids_BN.shape[-1] != cfg.num_time_ids:
        raise ValueError(
            f"SDXL time ids {cfg.time_ids} are {cfg.num_time_ids} numbers per sample, [B, "
            f"{cfg.num_time_ids}]; got shape {time_ids_BN.shape}"
        )
    outputs = cond_module.apply(
        {"params": cond_params}, tuple(token_ids), extra_skip_layers=clip_skip
    )
    context_BTD = jnp.concatenate([out.last_hidden_state for out in outputs], axis=-1)
    y_BD = text_time_embedding(outputs[-1].text_embeds, time_ids_BN, cfg.time_embed_dim)
    return context_BTD, y_BD.astype(context_BTD.dtype)


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
    both; "adm": `encoded` (or the raw `labels` when nothing encodes them) is the class vector y;
    "crossattn_adm" (SDXL): `encoded` is the pair (context, y) of `encode_sdxl_condition`.
    """
    if conditioning_key == "crossattn_adm":
        context, y = encoded
        return UNetConditioning(context=context, y=y)
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
