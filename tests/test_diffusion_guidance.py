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
from ldm_jax.diffusion.guidance import rescale_guidance


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


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(rescale):
    """rescale_guidance against diffusers' rescale_noise_cfg (the function its SD pipelines call)
    on the guided and conditional predictions of one batched CFG call."""
    import torch  # noqa: PLC0415
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (  # noqa: PLC0415
        rescale_noise_cfg,
    )

    x, t_B, cond, uncond = inputs()
    net = toy_net([])
    out_c, out_u = net(x, t_B, cond), net(x, t_B, uncond)
    guided = guidance_combine(out_u, out_c, 7.5)
    reference = rescale_noise_cfg(
        torch.from_numpy(np.asarray(guided)), torch.from_numpy(np.asarray(out_c)),
        guidance_rescale=rescale,
    ).numpy()  # fmt: skip
    ours = classifier_free_guidance(net, cond, uncond, 7.5, rescale)(x, t_B)
    assert float(np.abs(ours - reference).max() / np.abs(reference).max()) <= 1e-6
    traced = jax.jit(lambda r: classifier_free_guidance(net, cond, uncond, 7.5, r)(x, t_B))
    np.testing.assert_allclose(traced(jnp.float32(rescale)), reference, rtol=1e-5, atol=1e-6)
    if rescale:  # the rescale does something: the per-sample std moves to the conditional one's
        std = lambda a: np.std(np.asarray(a), axis=(1, 2, 3), ddof=1)  # noqa: E731
        np.testing.assert_allclose(std(ours), rescale * std(out_c) + (1 - rescale) * std(guided),
                                   rtol=1e-5)


def test_zero_rescale_is_exact_even_for_a_constant_prediction():
    guided = jnp.ones((2, 4, 4, 3))  # std 0: the rescaled branch would divide by zero
    out = rescale_guidance(guided, jnp.zeros_like(guided), jnp.float32(0.0))
    np.testing.assert_array_equal(out, guided)
    assert np.isfinite(np.asarray(rescale_guidance(guided, guided * 2, jnp.float32(0.5)))).all()
