"""Mesh and sharding rules, optimizer schedules and accumulation, EMA, diffusion loss targets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.diffusion.parameterization import alpha_sigma, to_x0_eps
from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.training.ema import ema_decay, update_ema
from ldm_jax.training.ldm_loss import diffusion_loss, min_snr_weights, noisy_input_and_target
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.sharding import (
    DEFAULT_LOGICAL_RULES,
    batch_sharding,
    data_parallel_size,
    logical_shardings,
    make_mesh,
)
from ldm_jax.training.state import create_sharded_state, new_train_state


def test_make_mesh_fills_the_minus_one_axis_and_rejects_bad_shapes():
    mesh = make_mesh(("data", "fsdp", "tensor"), (2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert data_parallel_size(mesh) == 8
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        make_mesh(("data", "fsdp"), (3, -1))
    with pytest.raises(ValueError, match="at most one -1"):
        make_mesh(("data", "fsdp"), (-1, -1))
    with pytest.raises(ValueError, match="8 are available"):
        make_mesh(("data", "fsdp"), (2, 2))


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        from ldm_jax.models.layers import GroupNorm, conv  # noqa: PLC0415

        h = conv(64, 3, name="conv", dtype=jnp.float32)(x)
        h = GroupNorm(dtype=jnp.float32, name="norm")(h)
        return conv(4, 3, name="out", dtype=jnp.float32)(h)  # 4 channels: not divisible by 8


def test_rules_shard_big_kernels_over_fsdp_and_replicate_the_rest():
    mesh = make_mesh(("data", "fsdp"), (1, -1))  # no "tensor" axis: rules naming it are ignored
    x = jnp.zeros((1, 8, 8, 3))
    tx, _ = make_optimizer(dict(learning_rate=1e-3))

    def init_fn(rng):
        return new_train_state(_Net().init(rng, x)["params"], tx, 1.0)

    state, shardings = create_sharded_state(init_fn, mesh, DEFAULT_LOGICAL_RULES, jax.random.key(0))
    kernel = state.params["conv"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 8)
    assert state.params["out"]["kernel"].sharding.spec == P(None, None, None, None)
    assert state.params["norm"]["scale"].sharding.spec == P(None)
    mu = state.opt_state[1][0].mu  # chain(clip, adamw): adam's first moment, sharded as params
    assert mu["conv"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    assert state.ema_params["conv"]["kernel"].sharding == kernel.sharding
    assert shardings.step.spec == P()
    abstract = jax.eval_shape(lambda: _Net().init(jax.random.key(0), x)["params"])
    specs = logical_shardings(abstract, mesh)
    assert specs["conv"]["bias"].spec == P("fsdp")


def test_warmup_then_cosine_schedule_and_validation():
    _, schedule = make_optimizer(
        dict(learning_rate=1.0, warmup_steps=4, schedule="cosine"), total_steps=14
    )
    assert [float(schedule(i)) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert float(schedule(9)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 5 / 10)))
    assert float(schedule(14)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown optimizer.schedule"):
        make_optimizer(dict(schedule="step"))
    with pytest.raises(ValueError, match="decay_steps or total_steps"):
        make_optimizer(dict(schedule="linear"))


def test_gradient_accumulation_applies_the_mean_every_k_steps():
    tx, _ = make_optimizer(
        dict(learning_rate=0.1, grad_accum_steps=2, weight_decay=0.0, grad_clip=None, b2=0.9)
    )
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert np.all(np.asarray(updates["w"]) == 0)  # accumulating
    updates, state = tx.update({"w": 3 * jnp.ones(3)}, state, params)
    reference, _ = optax.adamw(0.1, b2=0.9, weight_decay=0.0).update(
        {"w": 2 * jnp.ones(3)}, optax.adamw(0.1, b2=0.9, weight_decay=0.0).init(params), params
    )
    np.testing.assert_allclose(updates["w"], reference["w"], rtol=1e-6)


def test_ema_decay_warms_up_like_litema():
    assert [float(ema_decay(n, 0.9999)) for n in (1, 10, 100)] == pytest.approx(
        [2 / 11, 11 / 20, 101 / 110]
    )
    assert float(ema_decay(10**6, 0.9999)) == pytest.approx(0.9999)
    ema = update_ema({"a": jnp.ones(2)}, {"a": jnp.zeros(2)}, 0.75)
    np.testing.assert_allclose(ema["a"], [0.75, 0.75])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_targets_match_the_parameterisation(prediction_type):
    schedule = make_schedule("scaled_linear", 1000)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((4, 2, 2, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((4, 2, 2, 3)), jnp.float32)
    t = jnp.array([0, 10, 500, 999])
    x_t, target = noisy_input_and_target(schedule, x0, noise, t, prediction_type)
    alpha, sigma = alpha_sigma(schedule.alphas_cumprod[t])
    a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(x_t, a * x0 + s * noise, rtol=1e-5, atol=1e-6)
    # a perfect network output of this type converts back to the true x0 and eps
    x0_back, eps_back = to_x0_eps(target, x_t, a, s, prediction_type)
    np.testing.assert_allclose(eps_back, noise, atol=2e-3 if prediction_type == "sample" else 1e-4)
    np.testing.assert_allclose(x0_back, x0, atol=5e-2 if prediction_type == "epsilon" else 1e-4)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": a * noise - s * x0}
    np.testing.assert_allclose(target, expected[prediction_type], rtol=1e-5, atol=1e-6)


def test_min_snr_weights_follow_the_formula():
    schedule = make_schedule("scaled_linear", 1000)
    t = jnp.array([0, 50, 300, 999])
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = abar / (1 - abar)
    clipped = np.minimum(snr, 5.0)
    for kind, expected in (
        ("epsilon", clipped / snr),
        ("x0", clipped),
        ("v", clipped / (snr + 1)),
    ):
        np.testing.assert_allclose(min_snr_weights(schedule, t, 5.0, kind), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weights(schedule, t, 0.0, "eps")


def test_loss_is_zero_for_a_perfect_network_and_weighting_changes_it():
    schedule = make_schedule("scaled_linear", 1000)
    x0 = jnp.ones((16, 4, 4, 1))
    rng = jax.random.key(0)

    def perfect_eps(x_t, t_B):  # recovers eps from x_t exactly, knowing x0
        alpha, sigma = alpha_sigma(schedule.alphas_cumprod[t_B])
        return (x_t - alpha[:, None, None, None] * x0) / sigma[:, None, None, None]

    assert float(diffusion_loss(perfect_eps, schedule, x0, rng)) == pytest.approx(0, abs=1e-6)
    zero = lambda x_t, t_B: jnp.zeros_like(x_t)  # noqa: E731
    plain = float(diffusion_loss(zero, schedule, x0, rng))
    weighted = float(diffusion_loss(zero, schedule, x0, rng, "epsilon", min_snr_gamma=1.0))
    assert 0.5 < plain < 1.5 and weighted < plain  # eps weights min(snr, 1) / snr <= 1
