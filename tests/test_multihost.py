"""Multi-host training: 2 local processes x 4 CPU devices (gloo collectives, localhost coordinator)
agree with 1 process x 8 devices, step by step, and write one shared checkpoint."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from support import toy_regression_config, toy_task

from ldm_jax.training import loop, metrics
from ldm_jax.training.checkpointing import Checkpointer
from ldm_jax.training.config_overrides import load_config

TESTS = Path(__file__).resolve().parent
TOY = toy_regression_config.PATH
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    port = free_port()
    # the train CLI with the test-only toy task (support/train_toy.py; tests/ on the path)
    pythonpath = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    common = [sys.executable, str(TESTS / "support" / "train_toy.py"), "--config", TOY,
              "--workdir", str(tmp_path / "multi"), f"--config.train.num_steps={STEPS}",
              "--config.train.log_every=1", "--config.train.checkpoint_every=2",
              "--config.train.progress_bar=False",
              f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2"]
    procs = [
        subprocess.Popen([*common, f"--config.distributed.process_id={i}"], cwd=TESTS.parent,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    config = load_config(TOY)
    config.train.update(dict(num_steps=STEPS, log_every=1, checkpoint_every=2, progress_bar=False))
    loop.run(config, tmp_path / "single", toy_task.make_task(config))

    multi = metrics.read_jsonl(tmp_path / "multi" / "metrics.jsonl")  # written by process 0 only
    single = metrics.read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert sorted(multi) == list(range(1, STEPS + 1))
    for step in multi:
        np.testing.assert_allclose(multi[step]["loss"], single[step]["loss"], rtol=1e-6)
        np.testing.assert_allclose(multi[step]["grad_norm"], single[step]["grad_norm"], rtol=1e-6)

    # the 2-process checkpoint restores on 8 devices: same params, both iterator states inside
    checkpoints = Checkpointer(tmp_path / "multi" / "checkpoints")
    assert checkpoints.all_steps() == [2, 4]
    target = toy_task.make_task(config).init_state(jax.random.key(7))
    ours, _, _ = Checkpointer(tmp_path / "single" / "checkpoints").restore(STEPS, target)
    ours = jax.device_get(ours.params)
    saved = checkpoints.manager.restore(STEPS, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    assert saved["data"] == {"process_0": {"index": STEPS}, "process_1": {"index": STEPS}}
    state_target = toy_task.make_task(config).init_state(jax.random.key(8))
    theirs = checkpoints.manager.restore(
        STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(state_target))
    )["state"]
    # gloo's cross-process reductions sum in another order: equal up to float32 rounding
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours,
                 jax.device_get(theirs.params))
