"""Sampling timesteps: which training timesteps a sampler visits, in decreasing order.

Spacings and their references:

- ``"uniform"``, ``"quad"``: CompVis ``make_ddim_timesteps`` (stable-diffusion
  ldm/modules/diffusionmodules/util.py): ``arange(N) * (T // N)`` or
  ``int(linspace(0, sqrt(0.8 T), N) ** 2)``, then shifted by +1 ("add one to get the final alpha
  values right"). "uniform" equals diffusers "leading" with ``steps_offset=1``. Where CompVis would
  index past T - 1 (N = T), the +1 shift is dropped instead. "quad" repeats small timesteps for
  large N, as CompVis does.
- ``"leading"``: diffusers ``arange(N) * (T // N) + steps_offset`` (SD 1.x: ``steps_offset=1``);
  the offset is reduced where it would push the largest timestep past T - 1 (N = T, offset 1).
- ``"trailing"``: diffusers ``round(arange(T, 0, -T / N)) - 1`` (Lin et al. 2023, "Common Diffusion
  Noise Schedules and Sample Steps are Flawed", table 2), always exactly N steps (diffusers' float
  ``arange`` sometimes emits an extra ``-1``, which is dropped here).
- ``"linspace"``: diffusers ``round(linspace(0, T - 1, N))``.

Samplers step from ``timesteps[i]`` to ``prev_timesteps[i]``; a previous timestep of -1 stands for
clean data (abar = 1). ``previous_timesteps`` gives the next entry of the list (diffusers DDPM and
DPM-Solver, CompVis DDIM/PLMS with ``final=0``); ``strided_previous_timesteps`` gives
``t - T // N`` (diffusers DDIM and PNDM).
"""

from __future__ import annotations

import numpy as np

SPACINGS = ("uniform", "quad", "leading", "trailing", "linspace")


def make_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """Decreasing int32 timesteps in [0, T - 1] for ``num_steps`` sampling steps (1 <= N <= T)."""
    T, N = int(num_train_timesteps), int(num_steps)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {T}")
    if not 1 <= N <= T:
        raise ValueError(f"num_steps must be between 1 and num_train_timesteps={T}, got {N}")
    if steps_offset < 0:
        raise ValueError(f"steps_offset must be >= 0, got {steps_offset}")
    if spacing == "uniform":
        steps = np.arange(N) * (T // N)
        steps = steps + (1 if steps.max() + 1 <= T - 1 else 0)
    elif spacing == "quad":
        steps = (np.linspace(0, np.sqrt(T * 0.8), N) ** 2).astype(np.int64)
        steps = steps + (1 if steps.max() + 1 <= T - 1 else 0)
    elif spacing == "leading":
        steps = np.arange(N) * (T // N)
        steps = steps + min(steps_offset, T - 1 - steps.max())
    elif spacing == "trailing":
        steps = np.round(T - np.arange(N) * (T / N)).astype(np.int64)[::-1] - 1
    else:
        steps = np.linspace(0, T - 1, N).round()
    return np.ascontiguousarray(np.asarray(steps, dtype=np.int64)[::-1]).astype(np.int32)


def previous_timesteps(timesteps, final: int = -1) -> np.ndarray:
    """The next (smaller) entry of ``timesteps`` for each step, ``final`` after the last one.

    ``final=-1`` ends at clean data (abar = 1: diffusers ``set_alpha_to_one=True``, DDPM, DPM);
    ``final=0`` ends at abar_0 (CompVis DDIM/PLMS, diffusers ``set_alpha_to_one=False``).
    """
    t = np.asarray(timesteps, dtype=np.int32).reshape(-1)
    return np.concatenate([t[1:], np.array([final], np.int32)])


def strided_previous_timesteps(
    timesteps, num_train_timesteps: int = 1000, final: int = -1
) -> np.ndarray:
    """diffusers DDIM/PNDMScheduler's ``prev = t - T // N``; negative ones become ``final``."""
    t = np.asarray(timesteps, dtype=np.int32).reshape(-1)
    prev = t - num_train_timesteps // t.size
    return np.where(prev < 0, final, prev).astype(np.int32)
