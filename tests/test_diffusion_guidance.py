"""Classifier-free guidance: the combination, one batched call, scale 1 skipping the uncond half."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import (
    classifier_free_guidance,
    ddim,
    guidance_combine,
    make_schedule,
    make_timesteps,
)


def toy_net(calls):
    def apply_fn(x, t_B, cond):
        calls.append(x.shape[0])
        ctx = cond["context"].mean(axis=(1, 2))[:, None, None, None]
        return 0.1 * x + ctx + 1e-3 * t_B.astype(jnp.float32)[:, None, None, None]

    return apply_fn


def inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 4, 8, 8))
    cond = {"context": jax.random.normal(keys[1], (2, 7, 16))}
    uncond = {"context": jax.random.normal(keys[2], (2, 7, 16))}
    return x, jnp.array([10, 20], jnp.int32), cond, uncond


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_combination_in_one_batched_call(scale):
    x, t_B, cond, uncond = inputs()
    calls = []
    out = classifier_free_guidance(toy_net(calls), cond, uncond, scale)(x, t_B)
    assert calls == [4]  # uncond and cond in one call of batch 2B
    net = toy_net([])
    out_c, out_u = net(x, t_B, cond), net(x, t_B, uncond)
    np.testing.assert_allclose(out, out_u + scale * (out_c - out_u), atol=1e-6)
    if scale == 0.0:
        np.testing.assert_allclose(out, out_u, atol=1e-6)


def test_scale_one_is_cond_only():
    x, t_B, cond, uncond = inputs()
    calls = []
    out = classifier_free_guidance(toy_net(calls), cond, uncond, 1.0)(x, t_B)
    assert calls == [2]
    np.testing.assert_array_equal(out, toy_net([])(x, t_B, cond))
    np.testing.assert_allclose(guidance_combine(3.0, 5.0, 1.0), 5.0)
    with pytest.raises(ValueError, match="uncond"):
        classifier_free_guidance(toy_net([]), cond, None, 7.5)


def test_guided_sampling_under_jit_with_traced_scale():
    x, _, cond, uncond = inputs()
    schedule, timesteps = make_schedule(), make_timesteps(4)

    @jax.jit
    def run(x_T, cond, uncond, scale):
        denoise = classifier_free_guidance(toy_net([]), cond, uncond, scale)
        return ddim.sample(denoise, x_T, schedule, timesteps)

    guided = run(x, cond, uncond, jnp.float32(1.0))
    plain = jax.jit(
        lambda x_T: ddim.sample(lambda a, t: toy_net([])(a, t, cond), x_T, schedule, timesteps)
    )
    np.testing.assert_allclose(guided, plain(x), atol=1e-5)
