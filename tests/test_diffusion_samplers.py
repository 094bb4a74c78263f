"""Step-for-step parity of the samplers with diffusers' schedulers (fp32, max abs diff <= 1e-5).

Both sides run the same analytic denoiser from the same x_T (and the same per-step noise for DDPM
and DDIM eta > 0) on the same alphas_cumprod; every intermediate sample is compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from ldm_jax.diffusion import NoiseSchedule, ddim, ddpm, dpm_solver, plms
from ldm_jax.diffusion import timesteps as ts

T = 1000
SHAPE = (2, 4, 8, 8)
ABS_TOL = 1e-5
BASE = dict(
    num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


def jax_model(prediction_type, schedule):
    """An analytic denoiser that keeps samples O(1) (the Bayes-optimal one for unit-variance
    Gaussian data, eps = sigma_t x, plus a t-dependent bias); the v-model is its v-prediction
    analogue.

    (0.1 x + 0.05 sin(t / 100) drives the samples to |x| ~ 40, where 1e-5 is a few fp32 ulp;
    ``test_brief_denoiser_relative_parity`` checks that one with a relative bound.)
    """

    def fn(x, t_B):
        abar = schedule.alphas_cumprod[t_B][:, None, None, None]
        alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        s = t_B.astype(jnp.float32)[:, None, None, None] / 100.0
        if prediction_type == "v_prediction":
            return 0.5 * alpha * sigma * x - 0.05 * jnp.cos(s)
        return sigma * x + 0.05 * jnp.sin(s)

    return fn


def torch_model(prediction_type, scheduler, x, t):
    abar = scheduler.alphas_cumprod[t]
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    s = torch.tensor(float(t), dtype=torch.float32) / 100.0
    if prediction_type == "v_prediction":
        return 0.5 * alpha * sigma * x - 0.05 * torch.cos(s)
    return sigma * x + 0.05 * torch.sin(s)


def x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def schedule_of(scheduler):
    """The reference's own fp32 betas / alphas_cumprod, so only the sampler math is compared."""
    return NoiseSchedule(
        betas=jnp.asarray(scheduler.betas.numpy()),
        alphas_cumprod=jnp.asarray(scheduler.alphas_cumprod.numpy()),
    )


def run_ours(sampler, prediction_type, x, schedule, timesteps, **options):
    trajectory = []

    def record(i, sample):
        trajectory.append((int(i), np.asarray(sample)))

    fn = jax.jit(
        lambda x_T, sch: sampler(
            jax_model(prediction_type, sch),
            x_T,
            sch,
            timesteps,
            prediction_type=prediction_type,
            callback=record,
            **options,
        )
    )
    out = np.asarray(fn(jnp.asarray(x.numpy()), schedule))
    jax.effects_barrier()
    trajectory = [sample for _, sample in sorted(trajectory, key=lambda item: item[0])]
    np.testing.assert_array_equal(trajectory[-1], out)
    return np.stack(trajectory)


def run_reference(scheduler, prediction_type, x, step_kwargs=lambda i: {}):
    trajectory = []
    for i, t in enumerate(scheduler.timesteps):
        out = torch_model(prediction_type, scheduler, x, int(t))
        x = scheduler.step(out, t, x, **step_kwargs(i)).prev_sample
        trajectory.append(x.numpy())
    return np.stack(trajectory)


def check(parity, name, ours, reference):
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    abs_err = float(np.abs(ours - reference).max())
    parity(f"{name} (abs {abs_err:.1e})", ours, reference, tol=1e-5)
    assert abs_err <= ABS_TOL, f"{name}: max abs diff {abs_err:.3e} > {ABS_TOL:.0e}"


DDIM_CASES = [
    # (prediction, steps, spacing, offset, eta, set_alpha_to_one)
    ("epsilon", 1, "leading", 0, 0.0, True),
    ("epsilon", 7, "leading", 1, 0.0, False),
    ("epsilon", 50, "leading", 1, 0.0, False),
    ("epsilon", 50, "trailing", 0, 0.0, True),
    ("epsilon", 7, "linspace", 0, 1.0, True),
    ("epsilon", 50, "leading", 1, 1.0, False),
    ("v_prediction", 1, "trailing", 0, 1.0, True),
    ("v_prediction", 7, "trailing", 0, 0.0, True),
    ("v_prediction", 50, "leading", 1, 1.0, True),
]


@pytest.mark.parametrize("prediction_type,steps,spacing,offset,eta,alpha_to_one", DDIM_CASES)
def test_ddim_matches_diffusers(parity, prediction_type, steps, spacing, offset, eta, alpha_to_one):
    scheduler = DDIMScheduler(
        **BASE,
        clip_sample=False,
        set_alpha_to_one=alpha_to_one,
        steps_offset=offset,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    timesteps = ts.make_timesteps(steps, T, spacing, offset)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    prev = ts.strided_previous_timesteps(timesteps, T, final=-1 if alpha_to_one else 0)
    noise = torch.randn((steps,) + SHAPE, generator=torch.Generator().manual_seed(1))
    x = x_T()
    kwargs = (lambda i: {"eta": eta, "variance_noise": noise[i]}) if eta > 0 else (lambda i: {})
    reference = run_reference(scheduler, prediction_type, x, kwargs)
    options = {"eta": eta, "prev_timesteps": prev}
    if eta > 0:
        options["noise"] = noise.numpy()
    ours = run_ours(ddim.sample, prediction_type, x, schedule_of(scheduler), timesteps, **options)
    check(parity, f"ddim {prediction_type} N={steps} {spacing}+{offset} eta={eta}", ours, reference)


def test_ddim_clip_sample_matches_diffusers(parity):
    scheduler = DDIMScheduler(**BASE, clip_sample=True, steps_offset=1)
    scheduler.set_timesteps(7)
    timesteps = ts.make_timesteps(7, T, "leading", 1)
    prev = ts.strided_previous_timesteps(timesteps, T)
    reference = run_reference(scheduler, "epsilon", x_T())
    ours = run_ours(
        ddim.sample,
        "epsilon",
        x_T(),
        schedule_of(scheduler),
        timesteps,
        prev_timesteps=prev,
        clip_x0=1.0,
    )
    check(parity, "ddim epsilon N=7 clip_sample", ours, reference)


DDPM_CASES = [
    ("epsilon", 1, "leading", 0),
    ("epsilon", 7, "leading", 1),
    ("epsilon", 50, "trailing", 0),
    ("v_prediction", 7, "linspace", 0),
    ("v_prediction", 50, "leading", 1),
    ("sample", 7, "trailing", 0),
]


@pytest.mark.parametrize("prediction_type,steps,spacing,offset", DDPM_CASES)
def test_ddpm_matches_diffusers(parity, prediction_type, steps, spacing, offset):
    scheduler = DDPMScheduler(
        **BASE,
        clip_sample=False,
        variance_type="fixed_small",
        steps_offset=offset,
        timestep_spacing=spacing,
        prediction_type="sample" if prediction_type == "sample" else prediction_type,
    )
    scheduler.set_timesteps(steps)
    timesteps = ts.make_timesteps(steps, T, spacing, offset)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    seeds = [100 + i for i in range(steps)]
    # diffusers draws torch.randn(shape, generator) inside step(); a fresh generator per step lets
    # us precompute exactly the same noise for our sampler.
    noise = np.stack(
        [torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)).numpy() for s in seeds]
    )
    kwargs = lambda i: {"generator": torch.Generator().manual_seed(seeds[i])}
    reference = run_reference(scheduler, prediction_type, x_T(), kwargs)
    ours = run_ours(
        ddpm.sample, prediction_type, x_T(), schedule_of(scheduler), timesteps, noise=noise
    )
    check(parity, f"ddpm {prediction_type} N={steps} {spacing}+{offset}", ours, reference)


@pytest.mark.parametrize("steps,offset", [(1, 0), (2, 1), (7, 1), (50, 1), (50, 0)])
def test_plms_matches_diffusers_pndm(parity, steps, offset):
    scheduler = PNDMScheduler(**BASE, skip_prk_steps=True, steps_offset=offset)
    scheduler.set_timesteps(steps)
    timesteps = ts.make_timesteps(steps, T, "leading", offset)
    prev = ts.strided_previous_timesteps(timesteps, T, final=0)  # set_alpha_to_one=False
    reference = run_reference(scheduler, "epsilon", x_T())
    ours = run_ours(
        plms.sample, "epsilon", x_T(), schedule_of(scheduler), timesteps, prev_timesteps=prev
    )
    check(parity, f"plms epsilon N={steps} leading+{offset}", ours, reference)


DPM_CASES = [
    ("epsilon", 1, "linspace"),
    ("epsilon", 7, "linspace"),
    ("epsilon", 50, "linspace"),
    ("epsilon", 20, "trailing"),
    ("v_prediction", 2, "linspace"),
    ("v_prediction", 7, "trailing"),
    ("v_prediction", 50, "leading"),
]


@pytest.mark.parametrize("prediction_type,steps,spacing", DPM_CASES)
def test_dpm_solver_2m_matches_diffusers(parity, prediction_type, steps, spacing):
    scheduler = DPMSolverMultistepScheduler(
        **BASE,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.numpy()
    if spacing == "trailing":
        np.testing.assert_array_equal(timesteps, ts.make_timesteps(steps, T, spacing))
    reference = run_reference(scheduler, prediction_type, x_T())
    ours = run_ours(dpm_solver.sample, prediction_type, x_T(), schedule_of(scheduler), timesteps)
    check(parity, f"dpm++2m {prediction_type} N={steps} {spacing}", ours, reference)


@pytest.mark.parametrize("sampler_name", ["ddim", "dpm"])
def test_brief_denoiser_relative_parity(parity, sampler_name):
    """eps = 0.1 x + 0.05 sin(t / 100): samples grow to |x| ~ 40, so compare relative to scale."""

    def ours_model(x, t_B):
        return 0.1 * x + 0.05 * jnp.sin(t_B.astype(jnp.float32)[:, None, None, None] / 100.0)

    if sampler_name == "ddim":
        scheduler = DDIMScheduler(**BASE, clip_sample=False, steps_offset=1)
        sampler = ddim.sample
    else:
        scheduler = DPMSolverMultistepScheduler(**BASE, algorithm_type="dpmsolver++")
        sampler = dpm_solver.sample
    scheduler.set_timesteps(50)
    timesteps = scheduler.timesteps.numpy()
    x = x_T()
    reference = []
    for t in scheduler.timesteps:
        out = 0.1 * x + 0.05 * torch.sin(torch.tensor(float(t)) / 100.0)
        x = scheduler.step(out, t, x).prev_sample
        reference.append(x.numpy())
    options = {}
    if sampler_name == "ddim":
        options["prev_timesteps"] = ts.strided_previous_timesteps(timesteps, T)
    ours = sampler(
        ours_model, jnp.asarray(x_T().numpy()), schedule_of(scheduler), timesteps, **options
    )
    reference = np.stack(reference)
    assert np.abs(reference[-1]).max() > 10
    parity(
        f"{sampler_name} N=50 with 0.1 x + 0.05 sin(t/100) (final x)", ours, reference[-1], tol=1e-5
    )
