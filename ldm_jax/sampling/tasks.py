"""The sampling tasks a checkpoint supports, and their pieces inside the pipeline's jitted function.

- text-to-image: a text cond stage, conditioning_key "crossattn"; call with ``prompt``.
  SDXL (cond stage "sdxl", conditioning_key "crossattn_adm"; base and refiner) is text-to-image
  too: the context and the vector y come from ``encode_sdxl_condition`` (or from given
  prompt_embeds + pooled_prompt_embeds and the time ids).
- unconditional: no cond stage, conditioning_key None; ``batch_size``.
- class-conditional: cond stage "class" (cin256); ``class_labels``.
- image-to-image: any of the three above; add ``image`` and ``strength``.
- SD inpainting: text + concat_input "mask_and_masked_image"; ``prompt``, ``image``, ``mask_image``.
- LDM inpainting: concat_input "masked_image_and_mask"; ``image``, ``mask_image``.
- super-resolution: concat_input "low_res_image" (LDM BSR); ``low_res_image``.

Concatenated inputs follow the references exactly: SD inpainting (diffusers
StableDiffusionInpaintPipeline) feeds [x, mask at latent size, scale * mean(encode(image * (mask <
0.5)))]; LDM inpainting (CompVis scripts/inpaint.py) feeds [x, encode(masked), mask] with the
image masked in [0, 1] (masked pixels black, -1 after scaling) and the mask scaled to +-1, and
pastes the kept pixels of the image over the decoded result; super-resolution (diffusers
LDMSuperResolutionPipeline) feeds [x, low-res image in [-1, 1]] at latent size. Masks reach latent
size by nearest-neighbour subsampling (torch ``interpolate(size=...)``'s default mode). Image
latents are the first stage's posterior mean (KL) or pre-quantisation output (VQ): deterministic.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ldm_jax.latent_diffusion import SDXLInputs, encode_condition, unet_conditioning
from ldm_jax.models.conditioning import unconditional_class_ids
from ldm_jax.models.text_time import text_time_embedding
from ldm_jax.spec import TEXT_CONDITIONINGS

INPAINTING = ("mask_and_masked_image", "masked_image_and_mask")
SUPPORTED = (
    "text-to-image (clip/openclip/ldm_bert, crossattn; sdxl, crossattn_adm), SD inpainting "
    "(text + hybrid mask_and_masked_image), unconditional (no cond stage, no conditioning_key), "
    "class-conditional (class cond stage, crossattn), LDM inpainting (concat "
    "masked_image_and_mask), super-resolution (concat low_res_image)"
)


@dataclasses.dataclass(frozen=True)
class Task:
    conditioning: str | None  # "text", "class" or None
    concat: str | None  # DiffusionSpec.concat_input

    @property
    def name(self) -> str:
        if self.concat in INPAINTING:
            return "inpainting"
        if self.concat == "low_res_image":
            return "super-resolution"
        return {"text": "text-to-image", "class": "class-conditional"}.get(
            self.conditioning, "unconditional"
        )

    @property
    def takes_init_image(self) -> bool:
        """img2img (image + strength) works where nothing is concatenated to the latents."""
        return self.concat is None


def model_task(spec) -> Task:
    """The task of a checkpoint; NotImplementedError naming what is supported otherwise."""
    if spec.unet is None:
        raise ValueError("the checkpoint has no UNet (first stage only): nothing to sample")
    d, cond = spec.diffusion, spec.cond_stage
    kind = None if cond is None else cond.kind
    if kind == "sdxl" and d.conditioning_key == "crossattn_adm" and d.concat_input is None:
        return Task("text", None)
    concat = d.concat_input
    if concat is None and d.conditioning_key == "hybrid" and kind in TEXT_CONDITIONINGS:
        if spec.unet.in_channels == 2 * spec.first_stage.embed_dim + 1:  # specs saved before
            concat = "mask_and_masked_image"  # concat_input existed: SD inpainting
    key = d.conditioning_key
    if kind in TEXT_CONDITIONINGS:
        if (key, concat) in (("crossattn", None), ("hybrid", "mask_and_masked_image")):
            return Task("text", concat)
    elif kind == "class" and key == "crossattn" and concat is None:
        return Task("class", None)
    elif kind is None and key is None and concat is None:
        return Task(None, None)
    elif kind is None and key == "concat" and concat in ("masked_image_and_mask", "low_res_image"):
        return Task(None, concat)
    raise NotImplementedError(
        f"LatentDiffusionPipeline cannot sample this checkpoint (cond stage {kind!r}, "
        f"conditioning_key {key!r}, concat_input {concat!r}); supported: {SUPPORTED}"
    )


# --- pieces of the jitted sampling function (traced). `modules` and `params` share their keys
# ("unet", "first_stage", "cond_stage"): the Flax modules and their parameter trees.
def encode_image(spec, modules, params, image_BHWC):
    """[-1, 1] pixels -> unscaled latents, fp32 (KL posterior mean, VQ before quantisation)."""
    first_stage = modules["first_stage"]
    x = image_BHWC.astype(first_stage.dtype)
    out = first_stage.apply({"params": params["first_stage"]}, x, method="encode")
    latents = out if spec.first_stage_kind == "vq" else out.mode()
    return latents.astype(jnp.float32)


def nearest_downsample(mask_BHW1, h: int, w: int):
    """torch ``interpolate(mask, size=(h, w))`` (nearest): pixel floor(i * H / h)."""
    H, W = mask_BHW1.shape[1:3]
    rows = (jnp.arange(h) * H) // h
    cols = (jnp.arange(w) * W) // w
    return mask_BHW1[:, rows][:, :, cols]


def concat_input(spec, modules, params, task: Task, inputs):
    """The array concatenated to the latents along channels, or None."""
    h, w = inputs["noise"].shape[1:3]
    if task.concat == "low_res_image":
        return inputs["low_res"]
    if task.concat == "mask_and_masked_image":  # diffusers StableDiffusionInpaintPipeline
        mask = inputs["mask"]
        masked = inputs["image"] * (mask < 0.5)
        latents = encode_image(spec, modules, params, masked) * spec.diffusion.scale_factor
        return jnp.concatenate([nearest_downsample(mask, h, w), latents], axis=-1)
    if task.concat == "masked_image_and_mask":  # CompVis scripts/inpaint.py
        mask = inputs["mask"]
        masked = (1 - mask) * (inputs["image"] / 2 + 0.5) * 2 - 1
        latents = encode_image(spec, modules, params, masked)
        return jnp.concatenate([latents, nearest_downsample(mask * 2 - 1, h, w)], axis=-1)
    return None


def conditioning(spec, modules, params, task: Task, inputs, guided: bool, clip_skip=None):
    """(cond, uncond) UNetConditioning for ``classifier_free_guidance`` (uncond None unguided).

    Guided, the null condition (negative prompt or null class) and the condition are encoded in
    one batch [null; cond] and split. Text contexts given as embeddings ("context",
    "neg_context") replace the encoding of their token ids ("ids", "neg_ids").
    """
    context = uncontext = None
    if spec.cond_stage is not None and spec.cond_stage.kind == "sdxl":
        return sdxl_conditioning(spec, modules, params, inputs, guided, clip_skip)
    if task.conditioning == "text":
        wanted = {"context": "ids", "neg_context": "neg_ids"} if guided else {"context": "ids"}
        contexts = {key: inputs[key] for key in wanted if key in inputs}
        missing = [key for key in wanted if key not in inputs]
        if missing:
            ids = jnp.concatenate([inputs[wanted[key]] for key in missing])
            encoded = encode_condition(
                spec.cond_stage, modules["cond_stage"], params["cond_stage"], ids, clip_skip
            )
            contexts |= dict(zip(missing, jnp.split(encoded, len(missing)), strict=True))
        context, uncontext = contexts["context"], contexts.get("neg_context")
    elif task.conditioning == "class":
        labels = inputs["labels"]
        batch = labels.shape[0]
        if guided:
            null = unconditional_class_ids(spec.cond_stage.config, batch)
            labels = jnp.concatenate([null, labels])
        encoded = encode_condition(
            spec.cond_stage, modules["cond_stage"], params["cond_stage"], labels
        )
        context, uncontext = (encoded[batch:], encoded[:batch]) if guided else (encoded, None)
    extra = concat_input(spec, modules, params, task, inputs)
    key = spec.diffusion.conditioning_key
    cond = unet_conditioning(key, encoded=context, concat=extra)
    uncond = unet_conditioning(key, encoded=uncontext, concat=extra) if guided else None
    return cond, uncond


def sdxl_conditioning(spec, modules, params, inputs, guided: bool, clip_skip=None):
    """SDXL's (cond, uncond). Each side, the prompt's and (guided) the negative's ("neg_" keys),
    comes as token ids "ids" [B, encoders, T] (the sides with ids encoded in one batch
    [negative; prompt]) or as given embeddings "context" [B, S, D] + "pooled" [B, P] (diffusers'
    prompt_embeds / pooled_prompt_embeds); y = text_time_embedding(pooled, time ids [B, N]).
    "neg_keep" 0 zeroes an encoded negative's context and pooled embedding (y's first P
    entries; its time-id features stay), diffusers' force_zeros_for_empty_prompt."""
    cfg = spec.cond_stage.config
    sides = ("neg_", "") if guided else ("",)
    encoded = [side for side in sides if side + "ids" in inputs]
    pairs = {}
    if encoded:
        ids = jnp.concatenate([inputs[side + "ids"] for side in encoded])
        time_ids = jnp.concatenate([inputs[side + "time_ids"] for side in encoded])
        token_ids = tuple(ids[:, i] for i in range(ids.shape[1]))
        context, y = encode_condition(
            spec.cond_stage, modules["cond_stage"], params["cond_stage"],
            SDXLInputs(token_ids, time_ids), clip_skip,
        )  # fmt: skip
        n = len(encoded)
        splits = zip(jnp.split(context, n), jnp.split(y, n), strict=True)
        pairs = dict(zip(encoded, splits, strict=True))
    for side in sides:
        if side not in pairs:
            context = inputs[side + "context"]
            pooled, time_ids = inputs[side + "pooled"], inputs[side + "time_ids"]
            y = text_time_embedding(pooled, time_ids, cfg.time_embed_dim)
            pairs[side] = (context, y.astype(context.dtype))
    key = spec.diffusion.conditioning_key
    cond = unet_conditioning(key, encoded=pairs[""])
    if not guided:
        return cond, None
    uncontext, unpooled_y = pairs["neg_"]
    if "neg_keep" in inputs:
        keep = inputs["neg_keep"].astype(uncontext.dtype)
        pooled = cfg.text_encoders[-1].projection_dim
        uncontext = uncontext * keep[:, None, None]
        unpooled_y = unpooled_y.at[:, :pooled].multiply(keep[:, None])
    return cond, unet_conditioning(key, encoded=(uncontext, unpooled_y))


def initial_latents(spec, modules, params, inputs, start_abar=None):
    """x at the first visited step: the noise, or (image-to-image, ``start_abar`` given: that
    step's alpha-bar) the encoded image noised to it."""
    if start_abar is None:
        return inputs["noise"]
    z0 = encode_image(spec, modules, params, inputs["image"]) * spec.diffusion.scale_factor
    return jnp.sqrt(start_abar) * z0 + jnp.sqrt(1.0 - start_abar) * inputs["noise"]


def decode(spec, modules, params, task: Task, inputs, x0):
    """Final latents -> float images in [0, 1] (LDM inpainting: kept pixels pasted back)."""
    first_stage = modules["first_stage"]
    z = (x0 / spec.diffusion.scale_factor).astype(first_stage.dtype)
    x = first_stage.apply({"params": params["first_stage"]}, z, method="decode")
    images = jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    if task.concat == "masked_image_and_mask":
        mask = inputs["mask"]
        images = (1 - mask) * jnp.clip(inputs["image"] / 2 + 0.5, 0.0, 1.0) + mask * images
    return images
