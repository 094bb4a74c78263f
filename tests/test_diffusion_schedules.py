"""Noise schedules against diffusers' and CompVis' betas / alphas_cumprod, and q_sample."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ldm_jax.diffusion import NoiseSchedule, make_schedule, q_sample


@pytest.mark.parametrize(
    "kind,diffusers_kind,start,end",
    [
        ("scaled_linear", "scaled_linear", 0.00085, 0.012),
        ("compvis_linear", "scaled_linear", 0.0015, 0.0195),
        ("linear", "linear", 1e-4, 2e-2),
        ("cosine", "squaredcos_cap_v2", None, None),
    ],
)
def test_schedule_matches_diffusers(kind, diffusers_kind, start, end):
    extra = {} if start is None else {"beta_start": start, "beta_end": end}
    ours = make_schedule(kind, 1000, **extra)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_kind, **extra)
    assert ours.betas.dtype == jnp.float32 and ours.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=0)
    # diffusers accumulates the product in fp32, we in fp64: they differ by fp32 rounding only.
    np.testing.assert_allclose(
        ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-7
    )


def test_compvis_linear_and_cosine_formulas():
    """CompVis make_beta_schedule: linspace of sqrt (fp64) squared; cosine normalised by abar(0)."""
    T, s = 1000, 8e-3
    compvis_linear = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    np.testing.assert_allclose(
        make_schedule("compvis_linear").betas, compvis_linear.numpy(), rtol=1e-6
    )
    steps = torch.arange(T + 1, dtype=torch.float64) / T + s
    alphas = torch.cos(steps / (1 + s) * math.pi / 2) ** 2
    alphas = alphas / alphas[0]
    betas = np.clip((1 - alphas[1:] / alphas[:-1]).numpy(), 0, 0.999)
    ours = make_schedule("cosine", T)
    np.testing.assert_allclose(ours.betas, betas, rtol=1e-5)
    np.testing.assert_allclose(ours.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5, atol=1e-7)


def test_q_sample_matches_diffusers_add_noise():
    schedule = make_schedule("scaled_linear")
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    expected = ref.add_noise(x0, noise, t).numpy()
    ours = q_sample(schedule, jnp.asarray(x0.numpy()), jnp.asarray(t.numpy()), jnp.asarray(noise))
    np.testing.assert_allclose(ours, expected, atol=2e-6)
    half = q_sample(
        schedule, jnp.asarray(x0.numpy(), jnp.bfloat16), jnp.array([1, 2, 3]), noise.numpy()
    )
    assert half.dtype == jnp.bfloat16


def test_schedule_errors():
    with pytest.raises(ValueError, match="scaled_linear"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas([0.5, 1.5])
    assert make_schedule("linear", 10).num_train_timesteps == 10
