"""eps / x0 / v conversions: round trips, the v definition, and the eps adapter used by PLMS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import (
    alpha_sigma,
    as_epsilon_fn,
    from_x0_eps,
    make_schedule,
    make_timesteps,
    plms,
    to_eps,
    to_v,
    to_x0,
    to_x0_eps,
)


@pytest.fixture
def state():
    key0, key1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(key0, (3, 4, 4, 2))
    eps = jax.random.normal(key1, (3, 4, 4, 2))
    abar = jnp.array([0.9991, 0.5, 0.0047])[:, None, None, None]
    alpha, sigma = alpha_sigma(abar)
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "eps", "x0", "v"])
def test_round_trip(state, kind):
    x0, eps, alpha, sigma, x_t = state
    output = from_x0_eps(x0, eps, alpha, sigma, kind)
    x0_back, eps_back = to_x0_eps(output, x_t, alpha, sigma, kind)
    np.testing.assert_allclose(x0_back, x0, atol=2e-4)  # x0 from eps divides by alpha = 0.07
    np.testing.assert_allclose(eps_back, eps, atol=2e-4)
    np.testing.assert_allclose(to_x0(output, x_t, alpha, sigma, kind), x0_back, atol=1e-6)
    np.testing.assert_allclose(to_eps(output, x_t, alpha, sigma, kind), eps_back, atol=1e-6)
    for other in ("epsilon", "sample", "v_prediction"):  # eps <-> x0 <-> v through any path
        converted = from_x0_eps(x0_back, eps_back, alpha, sigma, other)
        np.testing.assert_allclose(to_x0_eps(converted, x_t, alpha, sigma, other)[0], x0, atol=3e-4)


def test_v_definition(state):
    x0, eps, alpha, sigma, x_t = state
    v = to_v(x0, eps, alpha, sigma)
    np.testing.assert_allclose(v, alpha * eps - sigma * x0, atol=1e-6)
    # x_t and v are a rotation of (x0, eps) by the angle phi with alpha = cos, sigma = sin
    np.testing.assert_allclose(alpha * x_t - sigma * v, x0, atol=1e-5)


def test_unknown_prediction_type(state):
    x0, eps, alpha, sigma, x_t = state
    with pytest.raises(ValueError, match="epsilon"):
        to_x0(x0, x_t, alpha, sigma, "flow")


def test_plms_rejects_v_models_and_as_epsilon_fn_converts():
    schedule = make_schedule()
    timesteps = make_timesteps(5, 1000, "leading", 1)
    x_T = jax.random.normal(jax.random.key(1), (2, 3, 4, 4))

    def eps_model(x, t_B):
        return jnp.sqrt(1.0 - schedule.alphas_cumprod[t_B])[:, None, None, None] * x

    def v_model(x, t_B):  # the same model, v-parameterised
        alpha, sigma = alpha_sigma(schedule.alphas_cumprod[t_B][:, None, None, None])
        eps = eps_model(x, t_B)
        return to_v(to_x0(eps, x, alpha, sigma, "epsilon"), eps, alpha, sigma)

    with pytest.raises(ValueError, match="PLMS needs eps"):
        plms.sample(v_model, x_T, schedule, timesteps, prediction_type="v_prediction")
    expected = plms.sample(eps_model, x_T, schedule, timesteps)
    converted = as_epsilon_fn(v_model, schedule, "v")
    np.testing.assert_allclose(
        plms.sample(converted, x_T, schedule, timesteps), expected, atol=1e-5
    )
