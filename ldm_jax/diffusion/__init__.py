"""Diffusion math of ldm_jax: noise schedules, parameterisations, sampling timesteps, samplers, CFG.

Every sampler has one signature::

    sample(denoise_fn, x_T, schedule, timesteps, *, prediction_type="epsilon", rng=None, **options)
        -> x_0

- ``denoise_fn(x_t, t_B) -> output``: a pure JAX function of the noisy sample (x_T's shape) and one
  int32 timestep per batch element; its output is eps, x0 or v per ``prediction_type`` ("epsilon",
  "sample", "v_prediction"; aliases "eps", "x0", "v"). Close the network's params over in the
  CALLER's jitted function (or use functools.partial); wrap it with ``classifier_free_guidance`` for
  CFG.
- ``x_T``: float32 noise; all sampler math runs in fp32 whatever the network's dtype.
- ``schedule``: a ``NoiseSchedule`` (a pytree: pass it as a jit argument).
- ``timesteps``: decreasing training timesteps (``make_timesteps``); the sampler steps from
  ``timesteps[i]`` to ``prev_timesteps[i]`` (option; default the next entry, then -1 = clean data).
- ``rng``: a PRNG key for the stochastic samplers (DDPM, DDIM with eta > 0), which also accept
  precomputed per-step ``noise`` [N, *x_T.shape].
- ``callback(i, x)``: optional host callback after every step (``jax.debug.callback``), for
  progress bars.

The whole loop is one ``lax.scan`` (sampler state in the carry), so ``jax.jit`` compiles a sampler
once per shape and step count. Samplers: ``ddpm`` (Ho et al. Alg. 2), ``ddim`` (Song et al. eq. 12,
``eta``), ``plms`` (Liu et al. PNDM, eps only), ``dpm_solver`` (Lu et al. DPM-Solver++(2M)),
``dpm_solver_sde`` (SDE-DPM-Solver++(2M)), ``unipc`` (Zhao et al. UniPC-2) and the sigma-space
ones of Karras et al. (``euler``, ``euler_ancestral``, ``heun``); each matches the corresponding
diffusers scheduler step for step (tests/test_diffusion_samplers*.py). ``SAMPLERS`` holds one
entry per row of ``ldm_jax.sampler_options.SAMPLER_TABLE`` (Karras variants with
``use_karras_sigmas=True`` bound) and resolves the aliases every entry point accepts
(``"dpm++"``, diffusers' class names). ``sampler_plans`` runs each with its diffusers scheduler's
timesteps.
"""

import functools

from ldm_jax.diffusion import (
    ddim,
    ddpm,
    dpm_solver,
    dpm_solver_sde,
    euler,
    euler_ancestral,
    heun,
    plms,
    unipc,
)
from ldm_jax.diffusion.guidance import classifier_free_guidance, guidance_combine
from ldm_jax.diffusion.parameterization import (
    PREDICTION_TYPES,
    alpha_sigma,
    as_epsilon_fn,
    from_x0_eps,
    to_eps,
    to_v,
    to_x0,
    to_x0_eps,
)
from ldm_jax.diffusion.schedules import NoiseSchedule, make_schedule, q_sample
from ldm_jax.diffusion.timesteps import (
    SPACINGS,
    make_timesteps,
    previous_timesteps,
    strided_previous_timesteps,
)
from ldm_jax.sampler_options import SAMPLER_ALIASES, SAMPLER_TABLE, canonical_sampler


class _Samplers(dict):
    """Canonical sampler name -> sample function; lookups (``[]``, ``in``, ``get``) also take the
    aliases of ``ldm_jax.sampler_options`` (one vocabulary for config, API and CLI), iteration
    gives each sampler once."""

    def __missing__(self, name):
        return self[canonical_sampler(name)]  # UnknownSamplerError (a KeyError) naming them all

    def __contains__(self, name):
        return dict.__contains__(self, SAMPLER_ALIASES.get(name, name))

    def get(self, name, default=None):
        return dict.get(self, SAMPLER_ALIASES.get(name, name), default)


_MODULES = {
    "ddim": ddim, "ddpm": ddpm, "plms": plms, "dpm_solver": dpm_solver,
    "dpm_solver_sde": dpm_solver_sde, "euler": euler, "euler_ancestral": euler_ancestral,
    "heun": heun, "unipc": unipc,
}  # fmt: skip


def _sample_function(info):
    sample = _MODULES[info.module].sample
    return functools.partial(sample, use_karras_sigmas=True) if info.karras else sample


SAMPLERS = _Samplers({info.name: _sample_function(info) for info in SAMPLER_TABLE})

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SAMPLER_ALIASES",
    "SPACINGS",
    "NoiseSchedule",
    "alpha_sigma",
    "as_epsilon_fn",
    "canonical_sampler",
    "classifier_free_guidance",
    "ddim",
    "ddpm",
    "dpm_solver",
    "dpm_solver_sde",
    "euler",
    "euler_ancestral",
    "heun",
    "from_x0_eps",
    "guidance_combine",
    "make_schedule",
    "make_timesteps",
    "plms",
    "previous_timesteps",
    "q_sample",
    "strided_previous_timesteps",
    "to_eps",
    "to_v",
    "to_x0",
    "to_x0_eps",
    "unipc",
]
