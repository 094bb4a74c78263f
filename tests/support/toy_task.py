"""Test scaffolding: a tiny sharded linear-regression task (config.trainer = "toy_regression",
config from support/toy_regression_config.py); tests register it with
`tasks.make_task(config, TOY_TASKS)` or run `support/train_toy.py`.

It exercises everything the loop does (sharded state, donated jitted step, deterministic
resumable batches, multi-host global batches, NaN stop) in milliseconds per step, so the loop's
tests and smoke runs do not depend on the diffusion model. config.toy: dim, out_dim, noise,
nan_at_step (test hook: the loss of that step becomes NaN).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.compile_options import compiler_options
from ldm_jax.training.ema import ema_decay, update_ema
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.setup import check_global_batch, mesh_from_config
from ldm_jax.training.sharding import batch_sharding, replicated
from ldm_jax.training.state import TrainState, create_sharded_state, new_train_state
from ldm_jax.training.tasks import TASKS


class SyntheticBatches:
    """Batch i is a pure function of (seed, i): x ~ N(0, 1), y = x @ w_true + noise.

    Every process builds the same global batch and contributes the rows its devices own.
    State: {"index": next batch number}.
    """

    def __init__(self, seed, global_batch, dim, out_dim, noise, sharding):
        self.seed, self.global_batch, self.dim, self.out_dim = seed, global_batch, dim, out_dim
        self.noise, self.sharding, self.index = noise, sharding, 0
        self.w_true = np.random.default_rng(seed).standard_normal((dim, out_dim)).astype(np.float32)

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        x = rng.standard_normal((self.global_batch, self.dim)).astype(np.float32)
        noise = rng.standard_normal((self.global_batch, self.out_dim)).astype(np.float32)
        y = x @ self.w_true + self.noise * noise
        self.index += 1
        return {
            name: jax.make_array_from_callback(value.shape, self.sharding, lambda i, v=value: v[i])
            for name, value in (("x", x), ("y", y))
        }

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


class ToyRegressionTask:
    def __init__(self, config):
        toy = config.toy
        self.config = config
        self.mesh = mesh_from_config(config)
        self.global_batch_size = int(config.data.global_batch_size)
        check_global_batch(self.global_batch_size, self.mesh)
        self.dim, self.out_dim = int(toy.dim), int(toy.out_dim)
        self.optimizer, self.schedule = make_optimizer(config.optimizer,
                                                       int(config.train.num_steps))
        self.rules = tuple(tuple(r) for r in config.sharding_rules)
        nan_at = int(toy.get("nan_at_step", -1))
        ema_max = float(config.ema.decay)

        def train_step(state, batch, rng):
            del rng  # deterministic model

            def loss_fn(params):
                pred = batch["x"] @ params["w"] + params["b"]
                loss = jnp.mean((pred - batch["y"]) ** 2)
                return jnp.where(state.step + 1 == nan_at, jnp.nan, 1.0) * loss

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            step = state.step + 1
            ema = update_ema(state.ema_params, params, ema_decay(step, ema_max))
            new_state = state.replace(step=step, params=params, opt_state=opt_state,
                                      ema_params=ema)
            metrics = {"loss": loss, "grad_norm": _norm(grads),
                       "learning_rate": self.schedule(state.step)}
            return new_state, metrics

        self._step = train_step
        self.train_step = None  # jitted in init_state, once the state shardings are known

    def _init(self, rng):
        w = jax.random.normal(rng, (self.dim, self.out_dim)) * 0.01
        params = {
            "w": nn.LogicallyPartitioned(w, names=("fan_in", "fan_out")),
            "b": nn.LogicallyPartitioned(jnp.zeros((self.out_dim,)), names=("norm",)),
        }
        return new_train_state(params, self.optimizer, 1.0)

    def init_state(self, rng) -> TrainState:
        state, shardings = create_sharded_state(self._init, self.mesh, self.rules, rng)
        data = batch_sharding(self.mesh)
        self.train_step = jax.jit(
            self._step,
            in_shardings=(shardings, {"x": data, "y": data}, replicated(self.mesh)),
            out_shardings=(shardings, replicated(self.mesh)),
            donate_argnums=0,
            compiler_options=compiler_options(),
        )
        return state

    def make_iterator(self) -> SyntheticBatches:
        return SyntheticBatches(int(self.config.data.get("shuffle_seed", 0)),
                                self.global_batch_size, self.dim, self.out_dim,
                                float(self.config.toy.noise), batch_sharding(self.mesh))

    def sample(self, state, rng):
        """A 'grid' of the EMA weights as a grey image (something real to log)."""
        w = np.asarray(jax.device_get(state.ema_params["w"]))
        scaled = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)
        grey = (scaled * 255).astype(np.uint8)
        return np.repeat(np.kron(grey, np.ones((4, 4), np.uint8))[..., None], 3, axis=-1)


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def make_task(config) -> ToyRegressionTask:
    return ToyRegressionTask(config)


# the production task table plus this one
TOY_TASKS = {**TASKS, "toy_regression": make_task}
