"""The sampling options every entry point takes (pipeline, CLIs, training configs), checked once.

One sampler vocabulary: ``SAMPLER_TABLE`` names every sampler once (with the diffusers scheduler
it matches); ``ldm_jax.diffusion.SAMPLERS`` has the same keys, and each alias (the CLI's
``dpm++``, diffusers' scheduler class names) means one of them, whichever entry point it is given
to. The number checks turn values that would sample silently wrong (nan or inf guidance:
guidance off or black images; eta > 1: nan) or fail late (a seed JAX cannot take) into one
ValueError before anything is compiled.

Pure Python (no jax) so the CLIs answer bad input at once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers


@dataclasses.dataclass(frozen=True)
class SamplerInfo:
    """One row of the sampler table: the name every entry point takes and what it means."""

    name: str
    module: str  # ldm_jax.diffusion.<module>.sample does the stepping
    diffusers: str  # the diffusers scheduler class it matches step for step
    karras: bool = False  # Karras et al. (2022) sigmas (diffusers: use_karras_sigmas=True)
    diffusers_config: tuple = ()  # further (key, value) settings of that scheduler
    stochastic: bool = False  # draws fresh noise every step (needs rng/seed)
    epsilon_only: bool = False  # cannot run v- or x0-prediction models


SAMPLER_TABLE = (
    SamplerInfo("ddim", "ddim", "DDIMScheduler"),
    SamplerInfo("ddpm", "ddpm", "DDPMScheduler", stochastic=True),
    SamplerInfo("plms", "plms", "PNDMScheduler", diffusers_config=(("skip_prk_steps", True),),
                epsilon_only=True),
    SamplerInfo("dpm_solver", "dpm_solver", "DPMSolverMultistepScheduler"),
    SamplerInfo("dpm++_2m_karras", "dpm_solver", "DPMSolverMultistepScheduler", karras=True),
    SamplerInfo("dpm++_2m_sde", "dpm_solver_sde", "DPMSolverMultistepScheduler",
                diffusers_config=(("algorithm_type", "sde-dpmsolver++"),), stochastic=True),
    SamplerInfo("dpm++_2m_sde_karras", "dpm_solver_sde", "DPMSolverMultistepScheduler",
                karras=True, diffusers_config=(("algorithm_type", "sde-dpmsolver++"),),
                stochastic=True),
    SamplerInfo("euler", "euler", "EulerDiscreteScheduler"),
    SamplerInfo("euler_karras", "euler", "EulerDiscreteScheduler", karras=True),
    SamplerInfo("euler_ancestral", "euler_ancestral", "EulerAncestralDiscreteScheduler",
                stochastic=True),
    SamplerInfo("heun", "heun", "HeunDiscreteScheduler"),
    SamplerInfo("unipc", "unipc", "UniPCMultistepScheduler"),
)  # fmt: skip
SAMPLER_INFO = {info.name: info for info in SAMPLER_TABLE}
SAMPLER_NAMES = tuple(SAMPLER_INFO)  # ldm_jax.diffusion.SAMPLERS' keys
# other names for the same samplers: the CLI's short ones and diffusers' scheduler classes (with
# their default settings; the Karras and SDE variants have their own names above)
SAMPLER_ALIASES = {
    "dpm++": "dpm_solver",
    "dpm++_2m": "dpm_solver",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "plms",
    "DPMSolverMultistepScheduler": "dpm_solver",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "UniPCMultistepScheduler": "unipc",
}
ALL_SAMPLER_NAMES = (*SAMPLER_NAMES, *SAMPLER_ALIASES)  # what every entry point accepts
# seeds are PRNGKey(seed): with JAX's default 32-bit ints only the low 32 bits count (2**32 would
# repeat seed 0's images) and Python ints past int64 overflow, so seeds are 32-bit and unsigned
MAX_SEED = 2**32 - 1


class UnknownSamplerError(ValueError, KeyError):
    """An unknown sampler name: a ValueError, and a KeyError for registry lookups."""

    __str__ = ValueError.__str__  # not KeyError's repr-quoted message


def canonical_sampler(name) -> str:
    """The canonical name (a ``ldm_jax.diffusion.SAMPLERS`` key) of a sampler name or alias."""
    if isinstance(name, str):
        if name in SAMPLER_NAMES:
            return name
        if name in SAMPLER_ALIASES:
            return SAMPLER_ALIASES[name]
    aliases = ", ".join(f"{a} = {c}" for a, c in SAMPLER_ALIASES.items())
    raise UnknownSamplerError(
        f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)} (aliases: {aliases})"
    )


def _number(value, name: str) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:  # Python, numpy and jax scalars
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_guidance(value, name: str = "guidance_scale") -> float:
    """A finite guidance scale (<= 1 means no guidance)."""
    return _number(value, name)


def check_eta(value, name: str = "eta") -> float:
    """A DDIM eta in [0, 1] (0: deterministic, 1: the DDPM posterior variance; above 1 the step's
    noise exceeds the variance left and DDIM's update is nan)."""
    eta = _number(value, name)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (0 = deterministic DDIM), got {eta}")
    return eta


def check_guidance_rescale(value, name: str = "guidance_rescale") -> float:
    """A guidance rescale factor in [0, 1] (Lin et al. 2023 eq. 16: 0 = plain CFG, the paper uses
    0.7); outside it the blend extrapolates past the rescaled and the plain prediction."""
    rescale = _number(value, name)
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (0 = off; 0.7 as in Lin et al.), got {rescale}")
    return rescale


def check_strength(value, name: str = "strength") -> float:
    """An image-to-image strength in (0, 1]."""
    strength = _number(value, name)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {strength}")
    return strength


def check_seed(value, name: str = "seed") -> int:
    """An integer seed in [0, MAX_SEED]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if getattr(getattr(value, "dtype", None), "kind", None) not in ("i", "u"):  # numpy/jax
            raise ValueError(f"{name} must be an integer in [0, 2**32 - 1], got {value!r}")
    try:
        seed = int(value)
    except TypeError:  # an array of several
        raise ValueError(f"{name} must be an integer in [0, 2**32 - 1], got {value!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**32 - 1] ({MAX_SEED}), got {seed}")
    return seed
