"""SDXL's host-side inputs: both tokenizers' ids or given embeddings for the prompt and the
negative prompt, and the micro-conditioning time ids, as diffusers' StableDiffusionXL pipelines
build them (the jitted side: sampling/tasks.py `sdxl_conditioning`)."""

from __future__ import annotations

import numpy as np

from ldm_jax.sampling.prompts import per_prompt, text_list


def sdxl_text_inputs(
    spec, tokenizer, prompt, negative_prompt=None, prompt_2=None, negative_prompt_2=None, *,
    guided: bool, embeds=(None,) * 4,
) -> dict:  # fmt: skip
    """SDXL's text inputs as diffusers' encode_prompt reads them. Each side, the prompt's and
    (guided) the negative's ("neg_" keys), is either token ids "ids" [B, encoders, T] (the
    encoders' tokenizers zipped with [prompt, prompt_2]: the refiner's one encoder reads
    ``prompt``; ``prompt_2`` defaults to ``prompt``) or given embeddings "context" [B, S, D] +
    "pooled" [B, P] (`sdxl_embeds`). ``embeds`` = (prompt_embeds, pooled_prompt_embeds,
    negative_prompt_embeds, negative_pooled_prompt_embeds), each pair given together or not at
    all. Guided without negative embeddings: zeros where the spec's
    ``force_zeros_for_empty_prompt`` and ``negative_prompt=None`` say so (an explicit "" is
    encoded) -- "neg_keep" [B] 0 with "neg_ids", or zero "neg_context"/"neg_pooled" when the
    prompt came as embeddings -- else the negative prompts' "neg_ids" ("neg_keep" 1)."""
    prompt_embeds, pooled, negative_embeds, negative_pooled = embeds
    texts = (("prompt", prompt), ("prompt_2", prompt_2))
    negative_texts = (("negative_prompt", negative_prompt),
                      ("negative_prompt_2", negative_prompt_2))  # fmt: skip
    given = _sdxl_embeds_pair(spec, prompt_embeds, pooled, "", texts)
    negative = _sdxl_embeds_pair(spec, negative_embeds, negative_pooled, "negative_",
                                 negative_texts)  # fmt: skip
    if given is not None:
        inputs = {"context": given[0], "pooled": given[1]}
        batch, tokens = given[0].shape[:2]
    elif prompt is None:
        raise ValueError(
            "this SDXL checkpoint needs prompt (or prompt_embeds + pooled_prompt_embeds)"
        )
    else:
        prompts = text_list(prompt, "prompt")
        batch, tokens = len(prompts), spec.cond_stage.config.text_encoders[0].max_length
        second = prompts if prompt_2 is None else per_prompt(prompt_2, batch, "prompt_2")
        inputs = {"ids": _sdxl_ids(tokenizer, [prompts, second])}
    if negative is not None:  # diffusers: the same shapes as the prompt's embeddings
        expected = ((batch, tokens, negative[0].shape[2]), (batch, negative[1].shape[1]))
        if (negative[0].shape, negative[1].shape) != expected:
            raise ValueError(
                f"negative_prompt_embeds / negative_pooled_prompt_embeds have shapes "
                f"{negative[0].shape} / {negative[1].shape}; they must match the prompt's: "
                f"{expected[0]} / {expected[1]}"
            )
        if guided:
            inputs |= {"neg_context": negative[0], "neg_pooled": negative[1]}
        return inputs
    if not guided:
        return inputs
    zeros = negative_prompt is None and spec.cond_stage.config.force_zeros_for_empty_prompt
    if given is not None and zeros:  # diffusers: zeros_like(prompt_embeds), zeros_like(pooled)
        return inputs | {"neg_context": np.zeros_like(given[0]),
                         "neg_pooled": np.zeros_like(given[1])}  # fmt: skip
    length = spec.cond_stage.config.text_encoders[0].max_length
    if tokens != length:  # the negative's encoding is [B, length, D]: it would not batch
        raise ValueError(
            f"prompt_embeds has {tokens} tokens but the negative prompt encodes to {length}: "
            f"pass negative_prompt_embeds + negative_pooled_prompt_embeds of shape "
            f"{(batch, tokens, given[0].shape[2])} / {given[1].shape}"
        )
    negatives = [""] * batch if negative_prompt is None else per_prompt(
        negative_prompt, batch, "negative_prompt"
    )  # fmt: skip
    negatives_2 = negatives if negative_prompt_2 is None else per_prompt(
        negative_prompt_2, batch, "negative_prompt_2"
    )  # fmt: skip
    inputs["neg_ids"] = _sdxl_ids(tokenizer, [negatives, negatives_2])
    inputs["neg_keep"] = np.full((batch,), 0.0 if zeros else 1.0, np.float32)
    return inputs


def _sdxl_embeds_pair(spec, embeds, pooled, prefix: str, texts):
    """(context, pooled) float32 of one side (prefix "" or "negative_"), checked; None when
    neither is given. Both or neither; not with that side's texts (diffusers' check_inputs)."""
    name, pooled_name = f"{prefix}prompt_embeds", f"{prefix}pooled_prompt_embeds"
    if embeds is None and pooled is None:
        return None
    if embeds is None or pooled is None:
        have, missing = (name, pooled_name) if pooled is None else (pooled_name, name)
        raise ValueError(
            f"{have} needs {missing} too (SDXL's context and the last encoder's pooled "
            f"embedding are given together): pass both, or {texts[0][0]} instead"
        )
    for text_name, text in texts:
        if text is not None:
            raise ValueError(f"pass {text_name} or {name}, not both")
    return sdxl_embeds(spec, embeds, pooled, prefix)


def sdxl_embeds(spec, embeds, pooled, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """float32 (context [B, S, D], pooled [B, P]) as diffusers' encode_prompt returns them:
    D = the sum of the text encoders' widths (their penultimate hidden states side by side),
    P = the last encoder's projection_dim; all finite."""
    encoders = spec.cond_stage.config.text_encoders
    widths = [e.width for e in encoders]
    width, projection = sum(widths), encoders[-1].projection_dim
    name, pooled_name = f"{prefix}prompt_embeds", f"{prefix}pooled_prompt_embeds"
    context, pooled = np.asarray(embeds), np.asarray(pooled)
    if context.ndim != 3 or context.shape[0] < 1 or context.shape[1] < 1 or (
        context.shape[2] != width
    ):  # fmt: skip
        sides = " + ".join(map(str, widths))
        raise ValueError(
            f"{name} must be shaped [batch, tokens, {width}] (the text encoders' hidden states "
            f"side by side: {sides}), got {context.shape}"
        )
    if pooled.shape != (context.shape[0], projection):
        raise ValueError(
            f"{pooled_name} must be shaped [{context.shape[0]}, {projection}] (the batch of "
            f"{name}; the last text encoder's projected pooled output), got {pooled.shape}"
        )
    for array, array_name in ((context, name), (pooled, pooled_name)):
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise ValueError(f"{array_name} must hold finite floats, got {array.dtype}")
    return context.astype(np.float32), pooled.astype(np.float32)


def _sdxl_ids(tokenizer, texts) -> np.ndarray:
    """int32 [B, encoders, T]: each tokenizer of SDXLTokenizers on its own texts."""
    tokenizers = tokenizer.tokenizers
    ids = [np.asarray(tok(t), np.int32) for tok, t in zip(tokenizers, texts, strict=False)]
    return np.stack(ids, axis=1)


SDXL_MICRO = {  # pipeline argument -> (time id, whether it is the negative's)
    "original_size": ("original_size", False),
    "crops_coords_top_left": ("crop_coords_top_left", False),
    "target_size": ("target_size", False),
    "aesthetic_score": ("aesthetic_score", False),
    "negative_original_size": ("original_size", True),
    "negative_crops_coords_top_left": ("crop_coords_top_left", True),
    "negative_target_size": ("target_size", True),
    "negative_aesthetic_score": ("aesthetic_score", True),
}


def sdxl_time_inputs(spec, batch: int, height: int, width: int, guided: bool, micro) -> dict:
    """SDXL's micro-conditioning as diffusers' pipelines build it: {"time_ids" [B, N], guided
    also "neg_time_ids"} in the spec's time id order, from the pipeline arguments ``micro`` (names
    of SDXL_MICRO; None = default). Defaults: sizes (height, width) of the output, crop (0, 0),
    aesthetic score 6.0 / negative 2.5. The negative's ids: base (StableDiffusionXLPipeline) the
    positive's unless negative_original_size AND negative_target_size are given; refiner
    (StableDiffusionXLImg2ImgPipeline, aesthetic score) negative_original_size defaults to
    original_size, its crop to (0, 0)."""
    given = {name: value for name, value in micro.items() if value is not None}
    sdxl = spec.cond_stage is not None and spec.cond_stage.kind == "sdxl"
    if not sdxl:
        if given:
            raise ValueError(f"{', '.join(sorted(given))}: for SDXL checkpoints only")
        return {}
    names = spec.cond_stage.config.time_ids
    for name in given:
        if SDXL_MICRO[name][0] not in names:
            raise ValueError(f"{name} does not apply: this SDXL checkpoint's time ids are {names}")
    values = {name: _micro_value(name, value) for name, value in given.items()}
    size = (float(height), float(width))
    pos = {
        "original_size": values.get("original_size", size),
        "crop_coords_top_left": values.get("crops_coords_top_left", (0.0, 0.0)),
        "target_size": values.get("target_size", size),
        "aesthetic_score": values.get("aesthetic_score", (6.0,)),
    }
    crop = values.get("negative_crops_coords_top_left", (0.0, 0.0))
    if "aesthetic_score" in names:
        neg = {
            "original_size": values.get("negative_original_size", pos["original_size"]),
            "crop_coords_top_left": crop,
            "aesthetic_score": values.get("negative_aesthetic_score", (2.5,)),
        }
    elif "negative_original_size" in values and "negative_target_size" in values:
        neg = {"original_size": values["negative_original_size"], "crop_coords_top_left": crop,
               "target_size": values["negative_target_size"]}  # fmt: skip
    else:
        neg = pos

    def row(ids):
        return np.tile(np.asarray([v for n in names for v in ids[n]], np.float32), (batch, 1))

    inputs = {"time_ids": row(pos)}
    if guided:
        inputs["neg_time_ids"] = row(neg)
    return inputs


def _micro_value(name: str, value) -> tuple[float, ...]:
    array = np.asarray(value, np.float64).reshape(-1)
    want = 1 if name.endswith("aesthetic_score") else 2
    if array.size != want or not np.isfinite(array).all():
        kind = "a number" if want == 1 else "a (height, width) / (top, left) pair of numbers"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return tuple(float(v) for v in array)
