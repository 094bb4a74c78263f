"""The checks a training config passes before any work starts (data, compile, or a write).

A bad value found after a stage has trained costs that stage's time (the default run's sampling
settings used to fail only after both stages), so train.py checks every stage's config up front:
step and batch counts, the mesh's shapes, and the sample settings (sampler name, steps,
guidance) the run will use.
Each failure is one ConfigError naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path

from ldm_jax.data.buckets import resolve_buckets
from ldm_jax.models.attention_dispatch import implementation_from_name
from ldm_jax.models.remat import check_remat
from ldm_jax.sampler_options import canonical_sampler, check_guidance
from ldm_jax.training.mesh_config import mesh_settings

LORA_EXPORT_FORMATS = ("peft", "kohya")


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type."""


def sampler_name(name) -> str:
    """The ldm_jax.diffusion.SAMPLERS key of a config's sampler name (aliases such as "dpm++":
    one vocabulary for config, API and CLI, ldm_jax/sampler_options.py)."""
    try:
        return canonical_sampler(name)
    except ValueError as error:
        raise ConfigError(f"sample.sampler: {error}") from None


def _integer(config, key: str, minimum: int) -> None:
    value = _get(config, key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if not (hasattr(node, "keys") and part in node.keys()):
            return None
        node = node[part]
    return node


def check_sample(config) -> None:
    """config.sample: a known sampler, steps >= 1, finite guidance, num_images >= 0."""
    if _get(config, "sample") is None:
        return
    sampler = _get(config, "sample.sampler")
    if sampler is not None:
        sampler_name(sampler)
    _integer(config, "sample.steps", 1)
    _integer(config, "sample.num_images", 0)
    guidance = _get(config, "sample.guidance")
    if guidance is not None:  # the pipeline's own rule (<= 1: no classifier-free guidance)
        try:
            check_guidance(guidance, "sample.guidance")
        except ValueError as error:
            raise ConfigError(str(error)) from None


def check_mesh(config) -> None:
    """config.mesh: axes, shape, dcn_shape, process_is_granule well formed (whether they fit the
    devices is checked when the mesh is built, after jax starts)."""
    if _get(config, "mesh") is None:
        return
    try:
        mesh_settings(config.mesh)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_execution(config) -> None:
    """config.remat and config.attention: known names (models/remat.py, attention_dispatch.py)."""
    for key, check in (("remat", check_remat), ("attention", implementation_from_name)):
        value = _get(config, key)
        if value is None or (key == "remat" and isinstance(value, bool)):
            continue  # remat True / False: the older spelling of "blocks" / "none"
        try:
            check(value)
        except ValueError as error:
            raise ConfigError(str(error)) from None


def check_buckets(config) -> None:
    """config.data's aspect-ratio buckets well formed (the model's multiple is checked when the
    task knows the model)."""
    if _get(config, "data") is None:
        return
    try:
        resolve_buckets(
            _get(config, "data.buckets"), _get(config, "data.bucket_area") or 0,
            _get(config, "data.bucket_step") or 64, _get(config, "data.bucket_max_aspect") or 4.0,
        )  # fmt: skip
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_lora(config) -> None:
    """config.lora well formed (before any work): rank, alpha, targets, export formats."""
    if _get(config, "lora") is None:
        return

    def get(key, default):
        value = _get(config, f"lora.{key}")
        return default if value is None else value

    rank, alpha = get("rank", 0), get("alpha", 0.0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"lora.rank={rank!r} must be an integer >= 0 (0: no LoRA)")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (
        math.isfinite(alpha) and alpha >= 0
    ):
        raise ConfigError(f"lora.alpha={alpha!r} must be a finite number >= 0 (0: = rank)")
    for key in ("unet_targets", "text_encoder_targets"):
        entries = get(key, ())
        if isinstance(entries, str) or not all(isinstance(e, str) and e for e in entries):
            raise ConfigError(
                f"lora.{key}={entries!r} must be a tuple of module names, e.g. "
                "('to_q', 'to_k', 'to_v', 'to_out.0')"
            )
    formats = get("export_formats", ())
    if isinstance(formats, str) or any(f not in LORA_EXPORT_FORMATS for f in formats):
        raise ConfigError(
            f"lora.export_formats={formats!r}; allowed: a tuple of {LORA_EXPORT_FORMATS}"
        )
    if rank and not (get("unet_targets", ()) or get("text_encoder_targets", ())):
        raise ConfigError("lora.rank > 0 needs lora.unet_targets or lora.text_encoder_targets")
    if rank and _get(config, "model.train_cond_stage") is True:
        raise ConfigError(
            "model.train_cond_stage=True trains the text encoder itself, but lora.rank > 0 "
            "freezes every network; adapt the text encoder with lora.text_encoder_targets"
        )


def check_dreambooth(config) -> None:
    """data.source "dreambooth": its folders, prompts and prior weight (ldm_jax/data/dreambooth)."""
    if _get(config, "data.source") != "dreambooth":
        return
    from ldm_jax.data.dreambooth import check_dreambooth_config  # noqa: PLC0415 (grain: lazy)

    try:
        check_dreambooth_config(config.data)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_stage(config) -> None:
    """One loop's config: steps, batch, mesh, remat / attention, buckets and sample settings."""
    _integer(config, "train.num_steps", 1)
    _integer(config, "data.global_batch_size", 1)
    _integer(config, "optimizer.grad_accum_steps", 1)
    check_buckets(config)
    check_mesh(config)
    check_execution(config)
    check_lora(config)
    check_dreambooth(config)
    check_sample(config)


def check_config(config) -> None:
    """Every stage of the run `config` describes (the default run: both stages), before any work."""
    if config.get("trainer", None) == "default" and "first_stage" in config:
        _integer(config, "first_stage.global_batch_size", 1)
        _integer(config, "first_stage.train.num_steps", 1)
    check_stage(config)


def check_workdir(workdir) -> None:
    """The workdir is a folder, or can become one (no file at it or above it)."""
    path = Path(workdir).absolute()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                what = "is" if place == path else f"is inside {place}, which is"
                raise ConfigError(f"--workdir {workdir} {what} a file, not a folder")
            return
