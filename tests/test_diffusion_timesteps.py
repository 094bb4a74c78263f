"""Sampling timesteps: diffusers' spacings, CompVis make_ddim_timesteps, ranges, arg checks."""

import numpy as np
import pytest
from diffusers import DDIMScheduler

from ldm_jax.diffusion import SPACINGS, make_timesteps, previous_timesteps
from ldm_jax.diffusion.timesteps import strided_previous_timesteps

T = 1000
CHECKED_STEPS = [1, 2, 3, 7, 10, 20, 25, 50, 61, 100, 103, 250, 333, 500, 999, 1000]


def compvis_make_ddim_timesteps(method, n, t):
    """CompVis stable-diffusion ldm/modules/diffusionmodules/util.py make_ddim_timesteps."""
    if method == "uniform":
        steps = (np.arange(0, n) * (t // n)).astype(int)
    else:
        steps = ((np.linspace(0, np.sqrt(t * 0.8), n)) ** 2).astype(int)
    return steps + 1


@pytest.mark.parametrize(
    "spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
)
def test_matches_diffusers_ddim(spacing, offset):
    scheduler = DDIMScheduler(num_train_timesteps=T, steps_offset=offset, timestep_spacing=spacing)
    for n in CHECKED_STEPS:
        scheduler.set_timesteps(n)
        expected = scheduler.timesteps.numpy()
        ours = make_timesteps(n, T, spacing, offset)
        if expected.max() > T - 1 or len(expected) != n:
            # diffusers' own out-of-range cases: leading+1 at N = T, trailing's extra -1 entry
            assert (spacing, offset, n) in {("leading", 1, 1000)} or spacing == "trailing"
            expected = expected[:n] if spacing == "trailing" else expected - 1
        np.testing.assert_array_equal(ours, expected, err_msg=f"{spacing}+{offset} N={n}")


@pytest.mark.parametrize("method", ["uniform", "quad"])
def test_matches_compvis(method):
    for n in CHECKED_STEPS[:-1]:  # CompVis indexes abar[1000] at N = T (out of range)
        expected = compvis_make_ddim_timesteps(method, n, T)[::-1]
        np.testing.assert_array_equal(make_timesteps(n, T, method), expected, err_msg=str(n))
    assert make_timesteps(1000, T, "uniform")[0] == T - 1


def test_uniform_equals_leading_with_offset_one():
    for n in (1, 7, 50, 999):
        np.testing.assert_array_equal(
            make_timesteps(n, T, "uniform"), make_timesteps(n, T, "leading", 1)
        )


@pytest.mark.parametrize("num_train", [1, 7, 999, 1000])
def test_every_step_count_is_in_range(num_train):
    for spacing in SPACINGS:
        for offset in (0, 1) if spacing == "leading" else (0,):
            for n in range(1, num_train + 1):
                steps = make_timesteps(n, num_train, spacing, offset)
                assert steps.dtype == np.int32 and len(steps) == n, (spacing, n)
                assert steps.min() >= 0 and steps.max() <= num_train - 1, (spacing, offset, n)
                assert np.all(np.diff(steps) <= 0), (spacing, n)
                if spacing != "quad":
                    assert np.all(np.diff(steps) < 0), (spacing, n)


def test_bad_arguments():
    with pytest.raises(ValueError, match="between 1 and"):
        make_timesteps(0, T)
    with pytest.raises(ValueError, match="between 1 and"):
        make_timesteps(T + 1, T)
    with pytest.raises(ValueError, match="'uniform', 'quad', 'leading', 'trailing', 'linspace'"):
        make_timesteps(10, T, "karras")


def test_previous_timesteps():
    t = make_timesteps(4, T, "leading", 1)  # 751, 501, 251, 1
    np.testing.assert_array_equal(previous_timesteps(t), [501, 251, 1, -1])
    np.testing.assert_array_equal(previous_timesteps(t, final=0), [501, 251, 1, 0])
    np.testing.assert_array_equal(strided_previous_timesteps(t, T), [501, 251, 1, -1])
    t = make_timesteps(7, T, "trailing")
    np.testing.assert_array_equal(strided_previous_timesteps(t, T), t - 142)
