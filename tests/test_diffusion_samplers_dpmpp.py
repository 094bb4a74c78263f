"""Step-for-step parity of DPM-Solver++(2M) with Karras sigmas, SDE-DPM-Solver++(2M) and UniPC with
diffusers' schedulers (fp32, max abs diff <= 1e-5), on the toy denoiser and helpers of
tests/test_diffusion_samplers.py; the stochastic sampler gets the same per-step noise on both sides.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from test_diffusion_samplers import (
    BASE,
    SHAPE,
    check,
    jax_model,
    run_ours,
    run_reference,
    schedule_of,
    x_T,
)

from ldm_jax.diffusion import dpm_solver, dpm_solver_sde, unipc


def dpm_scheduler(algorithm_type, prediction_type, steps, karras, spacing="linspace"):
    scheduler = DPMSolverMultistepScheduler(
        **BASE,
        algorithm_type=algorithm_type,
        solver_order=2,
        use_karras_sigmas=karras,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    return scheduler


KARRAS_CASES = [
    ("epsilon", 1),
    ("epsilon", 7),
    ("epsilon", 25),
    ("v_prediction", 4),
    ("v_prediction", 10),
]


@pytest.mark.parametrize("prediction_type,steps", KARRAS_CASES)
def test_dpm_solver_2m_karras_matches_diffusers(parity, prediction_type, steps):
    scheduler = dpm_scheduler("dpmsolver++", prediction_type, steps, karras=True)
    schedule = schedule_of(scheduler)
    # the Karras levels and the rounded timesteps the model sees are diffusers' own
    t_N, sigma_N, next_N = dpm_solver.step_sigmas(
        schedule, np.zeros(steps, np.int64), use_karras_sigmas=True
    )
    np.testing.assert_array_equal(np.asarray(t_N), scheduler.timesteps.numpy())
    np.testing.assert_allclose(np.asarray(sigma_N), scheduler.sigmas[:-1].numpy(), rtol=2e-6)
    assert float(next_N[-1]) == 0.0
    reference = run_reference(scheduler, prediction_type, x_T())
    # with Karras sigmas only the step count of ``timesteps`` matters (diffusers ignores spacing)
    ours = run_ours(
        dpm_solver.sample,
        prediction_type,
        x_T(),
        schedule,
        np.arange(steps)[::-1].copy(),
        use_karras_sigmas=True,
    )
    check(parity, f"dpm++2m karras {prediction_type} N={steps}", ours, reference)


SDE_CASES = [
    # (prediction, steps, karras, spacing)
    ("epsilon", 1, False, "linspace"),
    ("epsilon", 10, False, "trailing"),
    ("v_prediction", 7, False, "linspace"),
    ("v_prediction", 10, False, "leading"),
    ("epsilon", 4, True, "linspace"),
    ("v_prediction", 10, True, "linspace"),
    ("v_prediction", 25, True, "linspace"),
]


@pytest.mark.parametrize("prediction_type,steps,karras,spacing", SDE_CASES)
def test_dpm_solver_2m_sde_matches_diffusers(parity, prediction_type, steps, karras, spacing):
    scheduler = dpm_scheduler("sde-dpmsolver++", prediction_type, steps, karras, spacing)
    noise = torch.randn((steps,) + SHAPE, generator=torch.Generator().manual_seed(1))
    reference = run_reference(
        scheduler, prediction_type, x_T(), lambda i: {"variance_noise": noise[i]}
    )
    ours = run_ours(
        dpm_solver_sde.sample,
        prediction_type,
        x_T(),
        schedule_of(scheduler),
        scheduler.timesteps.numpy(),
        use_karras_sigmas=karras,
        noise=noise.numpy(),
    )
    name = f"dpm++2m sde {prediction_type} N={steps} {'karras' if karras else spacing}"
    check(parity, name, ours, reference)


def test_dpm_solver_2m_sde_rng():
    """rng draws: reproducible per key, different across keys, required without noise."""
    scheduler = dpm_scheduler("sde-dpmsolver++", "epsilon", 4, karras=False)
    schedule, timesteps = schedule_of(scheduler), scheduler.timesteps.numpy()
    x = jnp.asarray(x_T().numpy())

    def run(key):
        fn = jax_model("epsilon", schedule)
        return np.asarray(dpm_solver_sde.sample(fn, x, schedule, timesteps, rng=key))

    a, b = run(jax.random.key(0)), run(jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - run(jax.random.key(1))).max() > 1e-2
    with pytest.raises(ValueError, match="rng"):
        dpm_solver_sde.sample(jax_model("epsilon", schedule), x, schedule, timesteps)


UNIPC_CASES = [
    # (prediction, steps, karras, spacing)
    ("epsilon", 4, False, "linspace"),
    ("epsilon", 10, False, "trailing"),
    ("v_prediction", 7, False, "linspace"),
    ("v_prediction", 25, False, "leading"),
    ("epsilon", 7, True, "linspace"),
]


@pytest.mark.parametrize("prediction_type,steps,karras,spacing", UNIPC_CASES)
def test_unipc_matches_diffusers(parity, prediction_type, steps, karras, spacing):
    """UniPCMultistepScheduler defaults (bh2, order 2, predict_x0, corrector on every step)."""
    scheduler = UniPCMultistepScheduler(
        **BASE,
        use_karras_sigmas=karras,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    reference = run_reference(scheduler, prediction_type, x_T())
    ours = run_ours(
        unipc.sample,
        prediction_type,
        x_T(),
        schedule_of(scheduler),
        scheduler.timesteps.numpy(),
        use_karras_sigmas=karras,
    )
    check(
        parity,
        f"unipc {prediction_type} N={steps} {'karras' if karras else spacing}",
        ours,
        reference,
    )
