"""Each sampler of the table run as its diffusers scheduler runs it: timesteps, options, start.

diffusers builds a different timestep list per scheduler from the same config
(``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``):

- DDIM / PNDM (``ddim``, ``plms``): ``make_timesteps``; previous timestep ``t - T // N``.
- DDPM: ``make_timesteps``; previous = the next entry.
- DPMSolverMultistep / UniPCMultistep (``dpm_solver``, ``dpm++_*``, ``unipc``): N of N + 1 points
  ("linspace": ``round(linspace(0, T - 1, N + 1))[::-1][:-1]``; "leading": ``arange(N + 1) *
  (T // (N + 1))`` reversed, last dropped, + offset; "trailing" as DDIM), then clean data.
- Euler / Euler ancestral / Heun: float timesteps (``sigmas.sigma_timesteps``); the initial noise
  is scaled by sigma_max ("linspace", "trailing") or sqrt(sigma_max^2 + 1) ("leading").

CompVis spacings ("uniform", "quad") have no diffusers counterpart: every sampler takes
``make_timesteps``' list (as the pipeline always did); the sigma samplers start at
sqrt(sigma_max^2 + 1) there, exact for a VP sample.

Image-to-image starts at ``first_step`` (diffusers' ``set_begin_index``): the integer-timestep
samplers get the lists sliced, the others the whole list and ``first_step``, since Karras sigmas
depend on N. ``start_abar`` is the noise level (alpha-bar) of that first step, which the encoded
image is noised to.

SDXL's base -> refiner hand-off (``denoising_window``): ``denoising_end`` stops a run at
``last_step`` (the sliced lists for the integer samplers), ``denoising_start`` starts one at
``first_step``, both where diffusers' pipelines cut each scheduler's timestep list (Heun's lists
each step twice; PLMS takes ``denoising_end`` only).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import _common, sigmas
from ldm_jax.diffusion.dpm_solver import step_sigmas
from ldm_jax.diffusion.timesteps import (
    make_timesteps,
    previous_timesteps,
    strided_previous_timesteps,
)
from ldm_jax.sampler_options import SAMPLER_INFO, canonical_sampler

INTEGER_MODULES = ("ddim", "ddpm", "plms")  # int timesteps, stepping to prev_timesteps
SIGMA_MODULES = ("euler", "euler_ancestral", "heun")  # diffusers' *DiscreteScheduler family
MULTISTEP_MODULES = ("dpm_solver", "dpm_solver_sde", "unipc")
DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """What one sampler call gets: host timestep arrays and static keyword options."""

    name: str
    timesteps: np.ndarray  # [N'] int32 (float32 for the sigma samplers)
    prev_timesteps: np.ndarray | None  # [N'] int32, or None for the sampler's default
    options: tuple[tuple[str, object], ...]  # hashable: a static argument of a jitted function

    @property
    def module(self) -> str:
        return SAMPLER_INFO[self.name].module


def multistep_timesteps(num_steps: int, num_train_timesteps: int, spacing: str,
                        steps_offset: int = 0) -> np.ndarray:  # fmt: skip
    """diffusers DPMSolverMultistep/UniPCMultistep ``set_timesteps`` (decreasing int32)."""
    T, N = int(num_train_timesteps), int(num_steps)
    if not 1 <= N <= T:
        raise ValueError(f"num_steps must be between 1 and num_train_timesteps={T}, got {N}")
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
    elif spacing == "leading":
        steps = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1] + steps_offset
    else:
        return make_timesteps(N, T, spacing, steps_offset)
    return np.ascontiguousarray(steps).astype(np.int32)


def sampler_plan(name: str, diffusion, num_train_timesteps: int, num_steps: int,
                 first_step: int = 0, *, from_image: bool = False) -> SamplerPlan:  # fmt: skip
    """The plan of sampler ``name`` (or an alias) for ``num_steps`` steps under a
    ``DiffusionSpec``'s timestep settings, starting at ``first_step``; ``from_image``: x_T is a
    VP sample (image-to-image)."""
    name = canonical_sampler(name)
    info = SAMPLER_INFO[name]
    T, N = int(num_train_timesteps), int(num_steps)
    spacing, offset = diffusion.timestep_spacing, diffusion.steps_offset
    options: dict = {"use_karras_sigmas": True} if info.karras else {}
    if not 0 <= first_step < N:
        raise ValueError(f"first_step must be in [0, {N - 1}], got {first_step}")
    if info.module in INTEGER_MODULES:
        t_N = make_timesteps(N, T, spacing, offset)
        final = -1 if diffusion.set_alpha_to_one else 0
        if info.module == "ddpm":
            prev_N = previous_timesteps(t_N)
        else:
            prev_N = strided_previous_timesteps(t_N, T, final=final)
        return SamplerPlan(name, t_N[first_step:], prev_N[first_step:], tuple(options.items()))
    options["first_step"] = first_step
    if info.module in SIGMA_MODULES:
        if spacing in DIFFUSERS_SPACINGS:
            t_N = sigmas.sigma_timesteps(N, T, spacing, offset)
        else:
            t_N = make_timesteps(N, T, spacing, offset).astype(np.float32)
        leading = spacing not in ("linspace", "trailing")
        options["init_noise"] = "vp" if leading or from_image else "sigma_max"
        return SamplerPlan(name, t_N, None, tuple(sorted(options.items())))
    if spacing in DIFFUSERS_SPACINGS:
        t_N = multistep_timesteps(N, T, spacing, offset)
    else:
        t_N = make_timesteps(N, T, spacing, offset)
    return SamplerPlan(name, t_N, None, tuple(sorted(options.items())))


def _plan_sigmas(plan: SamplerPlan, schedule, timesteps, prev_timesteps):
    """(model timesteps [N'], VE sigma of each visited step [N']) as the sampler computes them."""
    options = dict(plan.options)
    karras, first = options.get("use_karras_sigmas", False), options.get("first_step", 0)
    if plan.module in SIGMA_MODULES:
        t_N, sigma_N1 = sigmas.sampling_sigmas(
            schedule, timesteps, use_karras_sigmas=karras, first_step=first,
            last_step=options.get("last_step"),
        )  # fmt: skip
        return t_N, sigma_N1[:-1]
    if plan.module in MULTISTEP_MODULES:
        t_N, sigma_N, _ = step_sigmas(
            schedule, timesteps, prev_timesteps, karras, first, options.get("last_step")
        )
        return t_N, sigma_N
    t_N = jnp.asarray(timesteps, jnp.int32)
    a = _common.abar(schedule, t_N)
    return t_N, jnp.sqrt((1.0 - a) / a)


def start_abar(plan: SamplerPlan, schedule, timesteps, prev_timesteps=None):
    """alpha-bar of the first visited step (traceable): image-to-image noises the image latents
    to sqrt(abar) z0 + sqrt(1 - abar) noise there, as the scheduler's ``add_noise`` does."""
    if plan.module in INTEGER_MODULES:
        return _common.abar(schedule, jnp.asarray(timesteps, jnp.int32)[0])
    _, sigma_N = _plan_sigmas(plan, schedule, timesteps, prev_timesteps)
    return 1.0 / (sigma_N[0] ** 2 + 1.0)


def visited_timesteps(plan: SamplerPlan, schedule) -> np.ndarray:
    """The timestep the network sees at each callback iteration (fractional for Euler with Karras
    sigmas; PLMS's extra iteration 1 evaluates at t_1, as PNDMScheduler's list repeats it)."""
    t_N, _ = _plan_sigmas(plan, schedule, plan.timesteps, plan.prev_timesteps)
    t_N = np.asarray(t_N)
    if plan.module == "plms" and t_N.shape[0] >= 2:
        return np.concatenate([t_N[:2], t_N[1:]])
    return t_N


# --- SDXL's base -> refiner hand-off (diffusers ``denoising_end`` / ``denoising_start``)
# the samplers whose run stops and resumes where diffusers' SDXL pipelines cut their schedulers
WINDOW_MODULES = ("ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpm_solver",
                  "dpm_solver_sde", "unipc")  # fmt: skip
END_ONLY_MODULES = ("plms",)  # denoising_end only: see _PLMS_START
_PLMS_START = (
    "denoising_start does not apply to plms: PNDMScheduler's timestep list repeats t1 for its "
    "warm-up ([t0, t1, t1, t2, ...]) and diffusers' img2img slices that list as if each step "
    "were one entry, so the restarted scheduler steps samples from a noise level they are not at "
    "(from its 2nd or 3rd call on); no PLMS run does that. Continue with ddim, ddpm, dpm_solver "
    "or unipc (PLMS' latents are VP samples, as theirs)"
)


def cutoff_timestep(fraction: float, num_train_timesteps: int) -> int:
    """diffusers' ``discrete_timestep_cutoff``: round(T - fraction * T)."""
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"denoising_start / denoising_end must be in (0, 1), got {fraction}")
    T = int(num_train_timesteps)
    return int(round(T - fraction * T))


def window_first_step(module: str, t_N: np.ndarray, cutoff: int) -> int:
    """The step ``denoising_start`` starts at, of the N distinct timesteps ``t_N`` (decreasing).

    StableDiffusionXLImg2ImgPipeline.get_timesteps runs the scheduler's timesteps < cutoff, from
    ``set_begin_index(len - count)``. One network call per entry (order 1: all but Heun; the
    multistep solvers restart with no history, as diffusers' ``model_outputs`` start empty):
    the first step below the cutoff. Heun (order 2) lists [t0, t1, t1, ..., t_{N-1}, t_{N-1}],
    so the count below the cutoff is even, and diffusers adds 1 "to end after the 2nd derivative
    step": the run starts one step earlier, at the last step >= the cutoff (the one a Heun
    ``denoising_end`` run ended with an Euler half-step), or at 0 when all are below it."""
    above = int((np.asarray(t_N) >= cutoff).sum())
    if module == "heun":
        return max(above - 1, 0)
    return above


def denoising_window(
    plan: SamplerPlan, schedule, num_train_timesteps: int, start=None, end=None
) -> SamplerPlan:
    """The plan run from ``start`` to ``end``, fractions of the noise schedule as diffusers'
    SDXL pipelines cut it: ``denoising_end`` keeps the steps whose timestep is >= the cutoff
    (base, ``StableDiffusionXLPipeline``), ``denoising_start`` the steps < its cutoff (refiner,
    ``StableDiffusionXLImg2ImgPipeline.get_timesteps``; a plan of all N steps;
    ``window_first_step``: Heun starts a step earlier). An image-to-image plan (strength) is cut
    within its steps, as diffusers' img2img does with denoising_end. Stopping early leaves the
    latents at the next step's noise level, in the sampler's own space (sigma space for
    Euler/Heun), where a ``start`` run with the same sampler and steps picks them up.

    The second-order and multistep solvers stop as diffusers' schedulers do when the pipeline
    stops calling them: Heun on the last step's Euler half (its list of timesteps >= the cutoff,
    [t0, t1, t1, ..., t_k], ends there), DPM-Solver++ / UniPC with the step order of the whole
    schedule (``lower_order_final`` only at the schedule's final step, ``last_step``) and UniPC's
    last prediction uncorrected; started at ``first_step`` they have no history (first order,
    no UniPC corrector at the first step). PLMS takes ``end`` only (``_PLMS_START``)."""
    if start is None and end is None:
        return plan
    if plan.module not in WINDOW_MODULES + END_ONLY_MODULES:
        raise ValueError(
            f"denoising_start / denoising_end need one of the samplers "
            f"{WINDOW_MODULES + END_ONLY_MODULES} (not {plan.name})"
        )
    if start is not None and plan.module in END_ONLY_MODULES:
        raise ValueError(_PLMS_START)
    if start is not None and end is not None and float(start) >= float(end):
        raise ValueError(f"denoising_start {start} must be below denoising_end {end}")
    options = dict(plan.options)
    offset = options.get("first_step", 0)  # image-to-image's strength: the window is within it
    if start is not None and offset:
        raise ValueError("denoising_start replaces strength: pass the plan of all steps")
    t_N = np.asarray(_plan_sigmas(plan, schedule, plan.timesteps, plan.prev_timesteps)[0])
    n, T = t_N.shape[0], num_train_timesteps
    first = 0 if start is None else window_first_step(plan.module, t_N, cutoff_timestep(start, T))
    last = n if end is None else int((t_N >= cutoff_timestep(end, T)).sum())
    if not first < last:
        raise ValueError(
            f"denoising_start={start} / denoising_end={end} leave none of the {n} steps "
            f"(timesteps {t_N.round(1).tolist()}): change them or num_inference_steps"
        )
    if plan.module in INTEGER_MODULES:
        prev = None if plan.prev_timesteps is None else plan.prev_timesteps[first:last]
        return dataclasses.replace(plan, timesteps=plan.timesteps[first:last], prev_timesteps=prev)
    options["first_step"] = offset + first
    if last < n:
        options["last_step"] = offset + last
    return dataclasses.replace(plan, options=tuple(sorted(options.items())))


def start_from_latents(plan: SamplerPlan, schedule, timesteps, prev_timesteps, latents):
    """x_T for a sampler that continues from ``latents`` of the same sampler (traceable): the
    sigma samplers scale x_T by sqrt(sigma^2 + 1) at the first step (init_noise "vp"), so the
    latents, already in sigma space, are divided by it here; the others take them as they are."""
    if plan.module in SIGMA_MODULES:
        return latents * jnp.sqrt(start_abar(plan, schedule, timesteps, prev_timesteps))
    return latents
