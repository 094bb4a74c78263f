"""Step-for-step parity of the sigma-space samplers (Euler, Euler ancestral, Heun) with diffusers'
EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and HeunDiscreteScheduler (fp32).

Both sides run the same analytic denoiser of (scaled input, float t) from the same x_T (and the
same per-step noise for Euler ancestral) on the same alphas_cumprod; every step's sample is
compared. The samples live in sigma space (|x| up to ~60 early on, where fp32 ulp is ~4e-6), so
the bound is 1e-5 on the sample divided by sqrt(sigma^2 + 1) (the VP sample; the final one, at
sigma = 0, is the image latent itself), and the raw sigma-space error is bounded relative to |x|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from test_diffusion_samplers import ABS_TOL, BASE, SHAPE, T, schedule_of, x_T

from ldm_jax.diffusion import euler, euler_ancestral, heun, sigmas


def jax_model(prediction_type):
    """A smooth analytic denoiser of (x_in, float t): eps ~ sqrt(t / T) x_in (close to the
    Bayes-optimal one for unit-variance data), plus a t-dependent bias; v analogously."""

    def fn(x, t_B):
        assert t_B.dtype == jnp.float32
        u = (t_B + 1.0)[:, None, None, None] / T
        s = t_B[:, None, None, None] / 100.0
        if prediction_type == "v_prediction":
            return 0.5 * jnp.sqrt(u * (1.0 - u) + 1e-3) * x - 0.05 * jnp.cos(s)
        return jnp.sqrt(u) * x + 0.05 * jnp.sin(s)

    return fn


def torch_model(prediction_type, x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    u = (t + 1.0) / T
    s = t / 100.0
    if prediction_type == "v_prediction":
        return 0.5 * torch.sqrt(u * (1.0 - u) + 1e-3) * x - 0.05 * torch.cos(s)
    return torch.sqrt(u) * x + 0.05 * torch.sin(s)


def run_ours(sampler, prediction_type, schedule, timesteps, **options):
    trajectory = []

    def record(i, sample):
        trajectory.append((int(i), np.asarray(sample)))

    fn = jax.jit(
        lambda x, sch, t_N: sampler(
            jax_model(prediction_type),
            x,
            sch,
            t_N,
            prediction_type=prediction_type,
            callback=record,
            **options,
        )
    )
    out = np.asarray(fn(jnp.asarray(x_T().numpy()), schedule, jnp.asarray(timesteps)))
    jax.effects_barrier()
    trajectory = [sample for _, sample in sorted(trajectory, key=lambda item: item[0])]
    np.testing.assert_array_equal(trajectory[-1], out)
    return np.stack(trajectory)


def run_reference(scheduler, prediction_type, step_kwargs=lambda i: {}):
    """diffusers' pipeline loop; returns (samples after each step, sigma after each step)."""
    x = x_T() * scheduler.init_noise_sigma
    samples, sigmas_after = [], []
    for i, t in enumerate(scheduler.timesteps):
        out = torch_model(prediction_type, scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **step_kwargs(i)).prev_sample
        samples.append(x.numpy())
        sigmas_after.append(float(scheduler.sigmas[scheduler.step_index]))
    return np.stack(samples), np.asarray(sigmas_after)


def check(parity, name, ours, reference, sigma_after):
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = np.sqrt(sigma_after.astype(np.float64) ** 2 + 1.0)[:, None, None, None, None]
    vp_err = float(np.abs((ours - reference) / scale).max())
    raw_err = float(np.abs(ours - reference).max())
    rel_err = float((np.abs(ours - reference) / (1.0 + np.abs(reference))).max())
    final_err = float(np.abs(ours[-1] - reference[-1]).max())
    parity(f"{name} (abs {raw_err:.1e}, vp abs {vp_err:.1e})", ours, reference, tol=1e-5)
    assert vp_err <= ABS_TOL, f"{name}: max abs diff of x / sqrt(sigma^2 + 1) {vp_err:.3e}"
    assert final_err <= ABS_TOL, f"{name}: final max abs diff {final_err:.3e}"
    assert rel_err <= ABS_TOL, f"{name}: max |diff| / (1 + |x|) {rel_err:.3e} (raw {raw_err:.1e})"


def init_noise(spacing):
    return "vp" if spacing == "leading" else "sigma_max"


CASES = [
    # (prediction, steps, spacing, offset, karras)
    ("epsilon", 4, "linspace", 0, False),
    ("epsilon", 7, "linspace", 0, False),
    ("epsilon", 10, "linspace", 0, False),
    ("v_prediction", 4, "linspace", 0, False),
    ("v_prediction", 10, "linspace", 0, False),
    ("epsilon", 7, "linspace", 0, True),
    ("epsilon", 10, "linspace", 0, True),
    ("v_prediction", 7, "linspace", 0, True),
    ("epsilon", 7, "leading", 1, False),
    ("v_prediction", 7, "trailing", 0, False),
    ("epsilon", 10, "leading", 1, True),
]


@pytest.mark.parametrize("prediction_type,steps,spacing,offset,karras", CASES)
def test_euler_matches_diffusers(parity, prediction_type, steps, spacing, offset, karras):
    scheduler = EulerDiscreteScheduler(
        **BASE,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=offset,
        use_karras_sigmas=karras,
    )
    scheduler.set_timesteps(steps)
    timesteps = sigmas.sigma_timesteps(steps, T, spacing, offset)
    if not karras:
        np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    reference, sigma_after = run_reference(scheduler, prediction_type)
    ours = run_ours(
        euler.sample,
        prediction_type,
        schedule_of(scheduler),
        timesteps,
        use_karras_sigmas=karras,
        init_noise=init_noise(spacing),
    )
    name = f"euler {prediction_type} N={steps} {spacing}+{offset} karras={karras}"
    check(parity, name, ours, reference, sigma_after)


@pytest.mark.parametrize("prediction_type,steps,spacing,offset,karras", CASES)
def test_heun_matches_diffusers(parity, prediction_type, steps, spacing, offset, karras):
    scheduler = HeunDiscreteScheduler(
        **BASE,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=offset,
        use_karras_sigmas=karras,
    )
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == 2 * steps - 1  # two evaluations per step but the last
    timesteps = sigmas.sigma_timesteps(steps, T, spacing, offset)
    reference, sigma_after = run_reference(scheduler, prediction_type)
    # diffusers' odd entries finish a step (its even ones are the Euler predictors), the last
    # entry is the final (Euler) step
    keep = list(range(1, 2 * steps - 2, 2)) + [2 * steps - 2]
    ours = run_ours(
        heun.sample,
        prediction_type,
        schedule_of(scheduler),
        timesteps,
        use_karras_sigmas=karras,
        init_noise=init_noise(spacing),
    )
    name = f"heun {prediction_type} N={steps} {spacing}+{offset} karras={karras}"
    check(parity, name, ours, reference[keep], sigma_after[keep])


ANCESTRAL_CASES = [
    ("epsilon", 4, "linspace", 0),
    ("epsilon", 7, "linspace", 0),
    ("epsilon", 10, "linspace", 0),
    ("v_prediction", 7, "linspace", 0),
    ("v_prediction", 10, "linspace", 0),
    ("epsilon", 7, "leading", 1),
    ("v_prediction", 7, "trailing", 0),
]


@pytest.mark.parametrize("prediction_type,steps,spacing,offset", ANCESTRAL_CASES)
def test_euler_ancestral_matches_diffusers(parity, prediction_type, steps, spacing, offset):
    scheduler = EulerAncestralDiscreteScheduler(
        **BASE, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset
    )
    scheduler.set_timesteps(steps)
    timesteps = sigmas.sigma_timesteps(steps, T, spacing, offset)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    # diffusers draws randn_tensor(shape, generator) inside step(); a fresh generator per step
    # lets us precompute exactly the same noise for our sampler
    seeds = [100 + i for i in range(steps)]
    noise = np.stack(
        [torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)).numpy() for s in seeds]
    )
    kwargs = lambda i: {"generator": torch.Generator().manual_seed(seeds[i])}
    reference, sigma_after = run_reference(scheduler, prediction_type, kwargs)
    ours = run_ours(
        euler_ancestral.sample,
        prediction_type,
        schedule_of(scheduler),
        timesteps,
        noise=noise,
        init_noise=init_noise(spacing),
    )
    name = f"euler_a {prediction_type} N={steps} {spacing}+{offset}"
    check(parity, name, ours, reference, sigma_after)


@pytest.mark.parametrize("steps,spacing,karras", [(7, "linspace", True), (10, "leading", True)])
def test_sampling_sigmas_match_diffusers(steps, spacing, karras):
    """sigmas and the (fractional, Karras) timesteps the denoiser sees, against set_timesteps."""
    scheduler = EulerDiscreteScheduler(
        **BASE, timestep_spacing=spacing, steps_offset=1, use_karras_sigmas=karras
    )
    scheduler.set_timesteps(steps)
    t_N, sigma_N1 = sigmas.sampling_sigmas(
        schedule_of(scheduler),
        sigmas.sigma_timesteps(steps, T, spacing, 1),
        use_karras_sigmas=karras,
    )
    np.testing.assert_allclose(sigma_N1, scheduler.sigmas.numpy(), rtol=2e-6, atol=0)
    np.testing.assert_allclose(t_N, scheduler.timesteps.numpy(), rtol=0, atol=2e-4)
    assert np.any(t_N != np.round(t_N))  # Karras timesteps are fractional


def test_euler_ancestral_rng():
    """rng draws per-step noise (deterministic per key); without rng or noise it refuses."""
    schedule = schedule_of(EulerAncestralDiscreteScheduler(**BASE))
    timesteps = sigmas.sigma_timesteps(5, T)
    x = jnp.asarray(x_T().numpy())
    run = jax.jit(
        lambda key: euler_ancestral.sample(jax_model("epsilon"), x, schedule, timesteps, rng=key)
    )
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a)) and float(jnp.abs(a - c).max()) > 1e-2
    with pytest.raises(ValueError, match="rng"):
        euler_ancestral.sample(jax_model("epsilon"), x, schedule, timesteps)


def test_heun_calls_denoiser_twice_per_step_but_last():
    """2N - 1 evaluations, as diffusers' interleaved timestep list has."""
    schedule = schedule_of(HeunDiscreteScheduler(**BASE))
    calls = []

    def model(x, t_B):
        jax.debug.callback(lambda t: calls.append(float(t[0])), t_B)
        return jax_model("epsilon")(x, t_B)

    steps = 4
    scheduler = HeunDiscreteScheduler(**BASE)
    scheduler.set_timesteps(steps)
    x = jnp.asarray(x_T().numpy())
    jax.block_until_ready(heun.sample(model, x, schedule, sigmas.sigma_timesteps(steps, T)))
    jax.effects_barrier()
    np.testing.assert_allclose(calls, scheduler.timesteps.numpy(), rtol=0, atol=1e-4)
