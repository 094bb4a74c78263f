"""diffusers `scheduler/scheduler_config.json` <-> DiffusionSpec, both directions in one place.

The scheduler config carries the noise schedule and parameterisation, and the settings that pick
the visited timesteps (`timestep_spacing`, `steps_offset`, `set_alpha_to_one`). A key the config
leaves out means what diffusers' DDIMScheduler means by it (leading / 0 / True), not the spec's own
defaults (the SD release values that CompVis files get): diffusers decides what its folders mean.
"""

from collections.abc import Mapping
from typing import Any

from ldm_jax.checkpoints.errors import ArchitectureError, UnsupportedExportError
from ldm_jax.checkpoints.validate import SCHEDULER_FIELDS, check_fields
from ldm_jax.spec import DiffusionSpec

SCHEDULER_FOLDER = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"
# diffusers scheduler beta_schedule -> ours (CompVis "linear" is diffusers "scaled_linear").
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear"}
_BETA_SCHEDULES["squaredcos_cap_v2"] = "cosine"
# The spacings diffusers' schedulers implement ("uniform" and "quad" are CompVis-only).
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
# DDIMScheduler's defaults for the timestep settings: what a config without the keys means.
DIFFUSERS_TIMESTEP_DEFAULTS = {
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": True,
}


def diffusion_from_scheduler(config: Mapping[str, Any], **kwargs) -> DiffusionSpec:
    """DiffusionSpec from a diffusers scheduler config (+ scale_factor, conditioning_key,
    concat_input, latent_size)."""
    check_fields(config, SCHEDULER_FIELDS, "scheduler config")
    if config.get("trained_betas") is not None:
        raise ArchitectureError("schedulers with trained_betas are not supported")
    schedule = config.get("beta_schedule", "linear")
    if schedule not in _BETA_SCHEDULES:
        raise ArchitectureError(
            f"scheduler beta_schedule {schedule!r}: allowed {list(_BETA_SCHEDULES)}"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ArchitectureError(
            f"scheduler prediction_type {prediction!r}: allowed 'epsilon', 'v_prediction'"
        )
    timesteps = {k: config.get(k, v) for k, v in DIFFUSERS_TIMESTEP_DEFAULTS.items()}
    if timesteps["timestep_spacing"] not in DIFFUSERS_SPACINGS:
        raise ArchitectureError(
            f"scheduler timestep_spacing {timesteps['timestep_spacing']!r}: "
            f"allowed {list(DIFFUSERS_SPACINGS)}"
        )
    try:
        return DiffusionSpec(
            num_timesteps=config.get("num_train_timesteps", 1000),
            beta_schedule=_BETA_SCHEDULES[schedule],
            linear_start=config.get("beta_start", 0.0001),
            linear_end=config.get("beta_end", 0.02),
            prediction_type=prediction,
            **timesteps,
            **kwargs,
        )
    except (TypeError, ValueError) as error:  # a value DiffusionSpec refuses
        raise ArchitectureError(f"scheduler config: {error}") from None


def scheduler_config(diffusion: DiffusionSpec, diffusers_version: str) -> dict[str, Any]:
    """The DDIMScheduler config of `diffusion` (the inverse of `diffusion_from_scheduler`)."""
    d = diffusion
    if d.timestep_spacing not in DIFFUSERS_SPACINGS:
        raise UnsupportedExportError(
            f"diffusers schedulers have no timestep_spacing {d.timestep_spacing!r}; allowed: "
            f"{list(DIFFUSERS_SPACINGS)} ('uniform' visits what 'leading' with steps_offset=1 "
            "does); export to compvis or orbax instead"
        )
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": diffusers_version,
        "num_train_timesteps": d.num_timesteps,
        "beta_start": d.linear_start,
        "beta_end": d.linear_end,
        "beta_schedule": "squaredcos_cap_v2" if d.beta_schedule == "cosine" else d.beta_schedule,
        "prediction_type": d.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": d.set_alpha_to_one,
        "steps_offset": d.steps_offset,
        "timestep_spacing": d.timestep_spacing,
    }
