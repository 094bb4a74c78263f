"""Host-side inputs of the sampling tasks: images, masks, class labels and strength, checked.

Images are accepted as a PIL image, a list of them, or an array [H, W, 3] / [B, H, W, 3] (uint8 in
[0, 255] or float in [0, 1], like the pipeline's outputs) and become float32 [B, H, W, 3] in
[-1, 1]. Masks (white = repaint) are a PIL image (any mode; converted to "L" as diffusers does) or
an array [H, W] / [H, W, 1] / [B, H, W] / [B, H, W, 1] and become float32 [B, H, W, 1] in {0, 1}
(>= 0.5 -> 1, diffusers' and CompVis' binarisation). One image or mask serves the whole batch.
Sizes are never changed silently: a wrong size is an error naming the expected one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ldm_jax.sampling.prompts import text_list
from ldm_jax.sampling.sdxl_inputs import sdxl_text_inputs
from ldm_jax.sampling.tasks import INPAINTING, Task
from ldm_jax.spec import CLIP_TEXT_CONDITIONINGS

# PIL's "L" conversion (ITU-R 601-2 luma), used for RGB mask arrays as PIL does for RGB images
_LUMA = np.array([299, 587, 114], np.float32) / 1000


def _is_pil(value) -> bool:
    return hasattr(value, "mode") and hasattr(value, "size") and hasattr(value, "convert")


def _to_unit_float(array: np.ndarray, name: str) -> np.ndarray:
    """uint8 -> / 255; floats must already lie in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 in [0, 255] or float in [0, 1], got {array.dtype}")
    array = array.astype(np.float32)
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(
            f"{name} float values must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]"
        )
    return array


def _stack(value, name: str, convert: str) -> np.ndarray:
    """PIL image(s) or an array -> numpy (PIL images converted to `convert` mode)."""
    if _is_pil(value):
        return np.asarray(value.convert(convert))[None]
    if isinstance(value, Sequence) and value and all(_is_pil(v) for v in value):
        sizes = {v.size for v in value}
        if len(sizes) > 1:
            raise ValueError(f"{name} images differ in size: {sorted(sizes)}")
        return np.stack([np.asarray(v.convert(convert)) for v in value])
    return np.asarray(value)


def _fit_batch(array: np.ndarray, batch: int, name: str) -> np.ndarray:
    if array.shape[0] == batch:
        return array
    if array.shape[0] == 1:
        return np.repeat(array, batch, axis=0)
    raise ValueError(
        f"{name} holds {array.shape[0]} images but the batch is {batch} (give 1 or {batch})"
    )


def _check_size(array: np.ndarray, size: tuple[int, int], name: str, hint: str) -> None:
    h, w = array.shape[1:3]
    if (h, w) != tuple(size):
        raise ValueError(
            f"{name} is {w}x{h} pixels (width x height) but {size[1]}x{size[0]} is needed{hint}; "
            "resize it first"
        )


def image_size(image, name: str = "image") -> tuple[int, int]:
    """(height, width) of an image input in any accepted form."""
    array = _stack(image, name, "RGB")
    if array.ndim not in (3, 4):
        raise ValueError(f"{name} must be shaped [H, W, 3] or [B, H, W, 3], got {array.shape}")
    return tuple(array.shape[-3:-1])


def image_batch(image, batch: int, size: tuple[int, int], name: str = "image",
                hint: str = "") -> np.ndarray:  # fmt: skip
    """float32 [batch, H, W, 3] in [-1, 1]; `size` = the (H, W) the call needs."""
    array = _stack(image, name, "RGB")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{name} must be RGB, shaped [H, W, 3] or [B, H, W, 3], got {array.shape}")
    _check_size(array, size, name, hint)
    return _fit_batch(_to_unit_float(array, name) * 2 - 1, batch, name)


def mask_batch(mask, batch: int, size: tuple[int, int], name: str = "mask_image") -> np.ndarray:
    """float32 [batch, H, W, 1] in {0, 1}: 1 = repaint (white), 0 = keep."""
    array = _stack(mask, name, "L")
    if array.ndim == 4 and array.shape[-1] == 3:  # RGB arrays: PIL's luma
        array = (_to_unit_float(array, name) @ _LUMA)[..., None]
    elif array.ndim == 2:
        array = array[None, ..., None]
    elif array.ndim == 3:
        array = array[..., None] if array.shape[-1] != 1 else array[None]
    if array.ndim != 4 or array.shape[-1] != 1:
        raise ValueError(
            f"{name} must be [H, W], [H, W, 1], [B, H, W] or [B, H, W, 1] (or RGB [B, H, W, 3]), "
            f"got {np.shape(mask)}"
        )
    _check_size(array, size, name, " (the image's size)")
    binary = (_to_unit_float(array, name) >= 0.5).astype(np.float32)
    return _fit_batch(binary, batch, name)


def class_label_batch(labels, n_classes: int, null_class: int | None) -> np.ndarray:
    """int32 [B] class ids in [0, n_classes) (the null class is not a label to ask for)."""
    array = np.atleast_1d(np.asarray(labels))
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"class_labels must be an int or a non-empty list of ints, got {labels!r}")
    real = n_classes - (1 if null_class == n_classes - 1 else 0)
    null = -1 if null_class is None else null_class
    bad = array[(array < 0) | (array >= real) | (array == null)]
    if bad.size:
        raise ValueError(f"class labels must lie in [0, {real - 1}], got {bad.tolist()}")
    return array.astype(np.int32)


def strength_slice(num_steps: int, strength: float) -> int:
    """Index of the first visited timestep for img2img (diffusers ``get_timesteps``).

    diffusers runs the last ``int(N * strength)`` of the N scheduled timesteps (strength 1: all
    of them, starting from the image noised to the first one).
    """
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    kept = min(int(num_steps * strength), num_steps)
    if kept < 1:
        raise ValueError(
            f"strength {strength} with {num_steps} steps leaves no denoising step "
            f"(int(steps * strength) = 0): raise strength or num_inference_steps"
        )
    return num_steps - kept


def latent_size(spec, height: int | None, width: int | None) -> tuple[int, int]:
    """(h, w) latent size for an output of height x width pixels (None: the spec's default)."""
    f = int(spec.first_stage.downsample_factor)
    default = spec.diffusion.latent_size * f
    sizes = []
    for name, value in (("height", height), ("width", width)):
        value = default if value is None else int(value)
        if value < f or value % f:
            raise ValueError(f"{name} must be a positive multiple of {f} (the VAE factor)")
        sizes.append(value // f)
    return sizes[0], sizes[1]


# --- the pipeline call's inputs (host arrays), checked against the checkpoint's task
def condition_inputs(
    task: Task, spec, tokenizer, prompt, negative_prompt, class_labels, batch_size, scale,
    prompt_embeds=None, negative_prompt_embeds=None, prompt_2=None, negative_prompt_2=None,
    pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
):  # fmt: skip
    """(host arrays, guided) for the model's conditioning: {"ids" or "context", "neg_ids" or
    "neg_context"} (text; SDXL: see `sdxl_text_inputs`) or {"labels"} (class)."""
    kind = task.conditioning
    sdxl = spec.cond_stage is not None and spec.cond_stage.kind == "sdxl"
    sdxl_only = (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2),
                 ("pooled_prompt_embeds", pooled_prompt_embeds),
                 ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds))  # fmt: skip
    for name, value in sdxl_only:
        if value is not None and not sdxl:
            raise ValueError(f"{name} applies to SDXL checkpoints only")
    wanted = {"text": "prompt", "class": "class_labels"}.get(kind)
    given = {"prompt": prompt, "prompt_embeds": prompt_embeds,
             "negative_prompt_embeds": negative_prompt_embeds, "class_labels": class_labels}
    applies = {"prompt": "text", "prompt_embeds": "text", "negative_prompt_embeds": "text",
               "class_labels": "class"}  # fmt: skip
    for name, value in given.items():
        if value is not None and applies[name] != kind:
            raise ValueError(
                f"{name} does not apply: this checkpoint ({task.name}) takes "
                f"{wanted or 'no conditioning (use batch_size)'}"
            )
    if wanted is not None and batch_size is not None:
        raise ValueError(f"batch_size does not apply: one image per {wanted} entry")
    if negative_prompt is not None and kind != "text":
        raise ValueError("negative_prompt needs a text-conditioned checkpoint")
    if kind == "class":
        if class_labels is None:
            raise ValueError(f"this checkpoint ({task.name}) needs class_labels")
        config = spec.cond_stage.config
        labels = class_label_batch(class_labels, config.n_classes, config.null_class)
        guided = float(scale) > 1.0
        if guided and config.null_class is None:
            raise ValueError(
                f"guidance_scale {scale} needs a null class, and this class embedder "
                f"({config.n_classes} classes) has none: pass guidance_scale=1"
            )
        return {"labels": labels}, guided
    if kind != "text":
        return {}, False
    guided = float(scale) > 1.0
    if sdxl:
        texts = (prompt, negative_prompt, prompt_2, negative_prompt_2)
        embeds = (prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                  negative_pooled_prompt_embeds)  # fmt: skip
        return sdxl_text_inputs(spec, tokenizer, *texts, guided=guided, embeds=embeds), guided
    inputs = {}
    if prompt_embeds is not None:
        if prompt is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        inputs["context"] = embeds_batch(spec, prompt_embeds, "prompt_embeds")
        prompts = None
        batch = inputs["context"].shape[0]
    elif prompt is None:
        raise ValueError(f"this checkpoint ({task.name}) needs prompt (or prompt_embeds)")
    else:
        prompts = text_list(prompt, "prompt")
        batch = len(prompts)
        inputs["ids"] = np.asarray(tokenizer(prompts), np.int32)
    if negative_prompt_embeds is not None:
        if negative_prompt is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        negative = embeds_batch(spec, negative_prompt_embeds, "negative_prompt_embeds")
        expected = inputs["context"].shape if "context" in inputs else negative.shape
        if negative.shape[0] != batch or negative.shape != expected:
            raise ValueError(
                f"negative_prompt_embeds has shape {negative.shape}; it must match the prompts "
                f"({batch} of them{', shape ' + str(expected) if 'context' in inputs else ''})"
            )
        if guided:
            inputs["neg_context"] = negative
        return inputs, guided
    if negative_prompt is None:
        negatives = [""] * batch
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * batch
    else:
        negatives = text_list(negative_prompt, "negative_prompt")
        if len(negatives) != batch:
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but prompt has {batch}"
            )
    if guided:
        inputs["neg_ids"] = np.asarray(tokenizer(negatives), np.int32)
    return inputs, guided


def embeds_batch(spec, embeds, name: str) -> np.ndarray:
    """float32 [B, S, D] text-encoder outputs, D the UNet's context width, all finite."""
    array = np.asarray(embeds)
    width = spec.unet.context_dim
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[2] != width:
        raise ValueError(
            f"{name} must be shaped [batch, tokens, {width}] (the text encoder's output), got "
            f"{array.shape}"
        )
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"{name} must hold finite floats, got {array.dtype}")
    return array.astype(np.float32)


def check_images_per_prompt(value) -> int:
    """num_images_per_prompt: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {value!r}")
    return int(value)


def check_clip_skip(spec, clip_skip) -> int:
    """clip_skip (diffusers' semantics: 1 = the layer before the usual output): 0 when None;
    CLIP/OpenCLIP text encoders only, fewer than the layers they run."""
    if clip_skip is None:
        return 0
    cond = spec.cond_stage
    if cond is not None and cond.kind == "sdxl":  # every encoder skips as many: the shortest
        encoders = cond.config.text_encoders
        layers = min(e.num_layers - e.skip_last_layers for e in encoders)
    elif cond is None or cond.kind not in CLIP_TEXT_CONDITIONINGS:
        kind = None if cond is None else cond.kind
        raise ValueError(f"clip_skip needs a CLIP or OpenCLIP text encoder (this one: {kind})")
    else:
        layers = cond.config.num_layers - cond.config.skip_last_layers
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int | np.integer) or not (
        0 <= clip_skip < layers
    ):
        raise ValueError(f"clip_skip must be an int in [0, {layers - 1}], got {clip_skip!r}")
    return int(clip_skip)


def image_inputs(task: Task, spec, batch, height, width, image, strength, mask, low_res):
    """(latent h, latent w, {"image", "mask", "low_res"} host arrays), all checked."""
    f = int(spec.first_stage.downsample_factor)
    inpainting = task.concat in INPAINTING
    for name, value, ok in (
        ("mask_image", mask, inpainting),
        ("low_res_image", low_res, task.concat == "low_res_image"),
        ("image", image, task.takes_init_image or inpainting),
        ("strength", strength, task.takes_init_image or task.concat == "mask_and_masked_image"),
    ):
        if value is not None and not ok:
            raise ValueError(f"{name} does not apply to this checkpoint ({task.name})")
    if inpainting and (image is None or mask is None):
        raise ValueError("inpainting needs image= and mask_image= (white = repaint)")
    if task.takes_init_image and (image is None) != (strength is None):
        raise ValueError("image-to-image needs both image= and strength= (in (0, 1])")
    if task.concat == "low_res_image":
        if low_res is None:
            raise ValueError("super-resolution needs low_res_image= (the image to upscale)")
        size = image_size(low_res, "low_res_image")
        height = size[0] * f if height is None else height
        width = size[1] * f if width is None else width
    elif image is not None:
        size = image_size(image)
        height = size[0] if height is None else height
        width = size[1] if width is None else width
    h, w = latent_size(spec, height, width)
    inputs = {}
    if image is not None:
        inputs["image"] = image_batch(image, batch, (h * f, w * f))
    if mask is not None:
        inputs["mask"] = mask_batch(mask, batch, (h * f, w * f))
    if low_res is not None:
        hint = f" (the output size / {f})"
        inputs["low_res"] = image_batch(low_res, batch, (h, w), "low_res_image", hint)
    return h, w, inputs
