"""Samplers under jit: one compilation across x_T values, callbacks, rng noise, argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import SAMPLERS, ddim, ddpm, make_schedule, make_timesteps


def model(x, t_B):
    return 0.1 * x + jnp.sin(t_B.astype(jnp.float32) / 100.0)[:, None, None, None] * 0.05


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_no_recompilation_across_x_T(name):
    schedule, timesteps = make_schedule(), make_timesteps(5, spacing="trailing")
    sampler = SAMPLERS[name]

    @functools.partial(jax.jit, static_argnames=())
    def run(x_T, schedule, timesteps, rng):
        return sampler(model, x_T, schedule, timesteps, rng=rng)

    outs = []
    for seed in range(3):
        x_T = jax.random.normal(jax.random.key(seed), (1, 2, 4, 4))
        outs.append(run(x_T, schedule, jnp.asarray(timesteps), jax.random.key(10 + seed)))
    assert run._cache_size() == 1
    assert all(np.isfinite(o).all() for o in outs)
    assert not np.allclose(outs[0], outs[1])


def test_callback_sees_every_step():
    seen = []
    x_T = jnp.ones((1, 2, 4, 4))
    out = jax.jit(
        lambda x: ddim.sample(
            model, x, make_schedule(), make_timesteps(6), callback=lambda i, x: seen.append(int(i))
        )
    )(x_T)
    jax.effects_barrier()
    assert sorted(seen) == list(range(6)) and np.isfinite(out).all()


def test_rng_noise_is_deterministic_and_required():
    schedule, timesteps = make_schedule(), make_timesteps(5)
    x_T = jax.random.normal(jax.random.key(0), (1, 2, 4, 4))
    a = ddim.sample(model, x_T, schedule, timesteps, eta=1.0, rng=jax.random.key(1))
    b = ddim.sample(model, x_T, schedule, timesteps, eta=1.0, rng=jax.random.key(1))
    c = ddim.sample(model, x_T, schedule, timesteps, eta=1.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="rng"):
        ddim.sample(model, x_T, schedule, timesteps, eta=1.0)
    with pytest.raises(ValueError, match="rng"):
        ddpm.sample(model, x_T, schedule, timesteps)
    with pytest.raises(ValueError, match="float32"):
        ddim.sample(model, x_T.astype(jnp.bfloat16), schedule, timesteps)


def test_bf16_network_keeps_fp32_sampler_state():
    schedule, timesteps = make_schedule(), make_timesteps(5)
    x_T = jax.random.normal(jax.random.key(0), (1, 2, 4, 4))
    bf16_model = lambda x, t: model(x.astype(jnp.bfloat16), t).astype(jnp.bfloat16)
    for name, sampler in SAMPLERS.items():
        out = sampler(bf16_model, x_T, schedule, timesteps, rng=jax.random.key(0))
        assert out.dtype == jnp.float32, name
