"""The generic training loop on the tiny regression task (8 fake CPU devices, in-process)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from support import toy_regression_config
from support.toy_task import TOY_TASKS

from ldm_jax.training import loop, metrics, tasks
from ldm_jax.training.checkpointing import Checkpointer
from ldm_jax.training.config_overrides import OverrideError, check_override_keys, load_config


def toy_config(**train):
    config = load_config(toy_regression_config.PATH)
    config.train.update(dict(num_steps=6, log_every=1, checkpoint_every=3, progress_bar=False))
    config.train.update(train)
    return config


def run(config, workdir):
    return loop.run(config, workdir, tasks.make_task(config, TOY_TASKS))


def final_params(config, workdir, step):
    task = tasks.make_task(config, TOY_TASKS)
    state = task.init_state(jax.random.key(123))  # a different init: restore must overwrite it
    restored, data_state, saved_config = Checkpointer(Path(workdir) / "checkpoints").restore(
        step, state
    )
    return jax.device_get(restored.params), data_state, saved_config


def losses(workdir):
    return {s: r["loss"] for s, r in metrics.read_jsonl(Path(workdir) / "metrics.jsonl").items()}


def test_params_and_optimizer_state_are_sharded(tmp_path):
    config = toy_config()
    task = tasks.make_task(config, TOY_TASKS)
    state = task.init_state(jax.random.key(0))
    w = state.params["w"]
    assert w.sharding.spec[1] == "fsdp"  # fan_out over the 8-way fsdp axis
    assert {s.data.shape for s in w.addressable_shards} == {(16, 1)}  # 8 column blocks
    adam_mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", ()) == w.shape]
    assert adam_mu and all(x.sharding.spec == w.sharding.spec for x in adam_mu)
    assert state.ema_params["w"].sharding.spec == w.sharding.spec


def test_run_logs_checkpoints_and_config(tmp_path):
    config = toy_config(sample_every=3)
    result = run(config, tmp_path)
    assert result.step == 6 and not result.preempted and int(result.state.step) == 6
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert {"loss", "grad_norm", "learning_rate"} <= set(records[1])
    assert records[6]["samples_per_second"] > 0 and "mfu" not in records[6]  # CPU: unknown peak
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 6
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3, 6]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "samples_00000003.png", "samples_00000006.png"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    _, data_state, saved_config = final_params(config, tmp_path, 6)
    assert data_state == {"index": 6}  # the checkpoint holds the iterator state
    assert saved_config["trainer"] == "toy_regression"


def test_loss_falls_when_overfitting(tmp_path):
    config = toy_config(num_steps=40, checkpoint_every=0)
    config.optimizer.update(dict(schedule="constant", learning_rate=0.1, grad_clip=0.0))
    config.toy.noise = 0.0
    run(config, tmp_path)
    loss = losses(tmp_path)
    assert loss[40] < 0.1 * loss[1]


def test_sigterm_stop_and_resume_is_exact(tmp_path):
    config = toy_config()
    run(config, tmp_path / "straight")
    config.train.debug.sigterm_at_step = 4  # a real SIGTERM to this process after step 4
    stopped = run(config, tmp_path / "resumed")
    assert (stopped.step, stopped.preempted) == (4, True)
    assert Checkpointer(tmp_path / "resumed" / "checkpoints").all_steps() == [3, 4]
    config.train.debug.sigterm_at_step = -1
    assert run(config, tmp_path / "resumed").step == 6
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a, _, _ = final_params(config, tmp_path / "straight", 6)
    b, _, _ = final_params(config, tmp_path / "resumed", 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_nan_loss_stops_without_saving(tmp_path):
    config = toy_config(num_steps=8, checkpoint_every=2)
    config.toy.nan_at_step = 5
    with pytest.raises(loop.NonFiniteLossError, match="step 5 .*loss=nan"):
        run(config, tmp_path)
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    assert checkpoints.all_steps() == [2, 4]
    params, _, _ = final_params(config, tmp_path, 4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_bad_inputs_are_one_clear_error():
    config = toy_config()
    with pytest.raises(OverrideError, match=r"'train.num_stepz'; did you mean train.num_steps"):
        check_override_keys(config, ["train.log_every", "train.num_stepz"])
    with pytest.raises(OverrideError, match="keys at the top level: data, distributed"):
        check_override_keys(config, ["trian"])
    config.data.global_batch_size = 12
    with pytest.raises(ValueError, match="12 is not divisible by the data-parallel size 8"):
        tasks.make_task(config, TOY_TASKS)
    config.trainer = "gan"
    with pytest.raises(ValueError, match="unknown config.trainer 'gan'; allowed: .*ldm"):
        tasks.make_task(config, TOY_TASKS)
    config.trainer = "toy_regression"  # test scaffolding: production does not know it
    with pytest.raises(ValueError, match="'toy_regression'; allowed: autoencoder, default, ldm$"):
        tasks.make_task(config)


def test_mfu_helpers():
    assert metrics.peak_flops_per_device("cpu") is None
    assert metrics.peak_flops_per_device("cpu", configured=1e12) == 1e12
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
    assert metrics.mfu(1e12, 2.0, 4e12) == 0.5
    assert metrics.mfu(None, 2.0, 4e12) is None and metrics.mfu(1e12, 2.0, None) is None
    # cost analysis counts one device's share of a sharded matmul
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    x = jax.device_put(np.ones((64, 32), np.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    compiled = jax.jit(lambda a, b: a @ b).lower(x, np.ones((32, 16), np.float32)).compile()
    assert metrics.compiled_flops(compiled) == pytest.approx(2 * 64 * 32 * 16 / 8)
