"""Multi-host training: 2 local processes x 4 CPU devices (gloo collectives, localhost coordinator)
agree with 1 process x 8 devices, step by step, and write one shared checkpoint; a SIGTERM to one
of them stops both at the same saved step, and the rerun ends exactly where an uninterrupted run
does; a hybrid (ICI x DCN) mesh with each process as a slice puts each process's devices in one
block of the DCN axis and trains as the one-process run does."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from support import toy_regression_config, toy_task

from ldm_jax.training import loop, metrics
from ldm_jax.training.checkpointing import Checkpointer
from ldm_jax.training.config_overrides import load_config

TESTS = Path(__file__).resolve().parent
TOY = toy_regression_config.PATH
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, steps, *overrides, only_process_1=()):
    """`train_toy.py` as 2 local processes x 4 CPU devices; [(return code, output)] per process.
    `only_process_1`: overrides given to process 1 alone (e.g. a SIGTERM at one step)."""
    port = free_port()
    # the train CLI with the test-only toy task (support/train_toy.py; tests/ on the path)
    pythonpath = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    common = [sys.executable, str(TESTS / "support" / "train_toy.py"), "--config", TOY,
              "--workdir", str(workdir), f"--config.train.num_steps={steps}",
              "--config.train.log_every=1", "--config.train.checkpoint_every=2",
              "--config.train.progress_bar=False",
              f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2", *overrides]
    procs = [
        subprocess.Popen([*common, f"--config.distributed.process_id={i}",
                          *(only_process_1 if i == 1 else ())], cwd=TESTS.parent,
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
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-process run of STEPS steps (shared: each run costs ~10 s of start-up)."""
    workdir = tmp_path_factory.mktemp("multi")
    for code, out in run_two_processes(workdir, STEPS):
        assert code == 0, out[-3000:]
    return workdir


def test_two_processes_agree_with_one(tmp_path, straight):

    config = load_config(TOY)
    config.train.update(dict(num_steps=STEPS, log_every=1, checkpoint_every=2, progress_bar=False))
    loop.run(config, tmp_path / "single", toy_task.make_task(config))

    multi = metrics.read_jsonl(straight / "metrics.jsonl")  # written by process 0 only
    single = metrics.read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert sorted(multi) == list(range(1, STEPS + 1))
    for step in multi:
        np.testing.assert_allclose(multi[step]["loss"], single[step]["loss"], rtol=1e-6)
        np.testing.assert_allclose(multi[step]["grad_norm"], single[step]["grad_norm"], rtol=1e-6)

    # the 2-process checkpoint restores on 8 devices: same params, both iterator states inside
    checkpoints = Checkpointer(straight / "checkpoints")
    assert checkpoints.all_steps() == [2, 4, 6]
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


# data 2 x fsdp 4: within a process data 2 x fsdp 2, the 2 processes along fsdp (DCN); the same
# overrides in one process give data 2 x fsdp 4 (dcn -1 = the one process)
HYBRID = {"shape": (2, -1, 1), "dcn_shape": (1, -1, 1), "process_is_granule": True}


def test_hybrid_mesh_places_processes_along_the_dcn_axis_and_agrees_with_one(tmp_path):
    overrides = [f"--config.mesh.{key}={value}".replace(" ", "") for key, value in HYBRID.items()]
    runs = run_two_processes(tmp_path / "hybrid", STEPS, *overrides)
    for code, out in runs:
        assert code == 0, out[-3000:]
        assert "mesh_utils.create_hybrid_device_mesh" in out, out[-3000:]
        # process 0 owns fsdp 0-1 of both data rows; a plain reshape of jax.devices() would give
        # it the whole first data row
        assert "mesh process layout: [[[0], [0], [1], [1]], [[0], [0], [1], [1]]]" in out, (
            out[-3000:])

    config = load_config(TOY)
    config.train.update(dict(num_steps=STEPS, log_every=1, checkpoint_every=0,
                             progress_bar=False))
    config.mesh.update(HYBRID)
    single_task = toy_task.make_task(config)
    assert dict(single_task.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    loop.run(config, tmp_path / "single", single_task)
    multi = metrics.read_jsonl(tmp_path / "hybrid" / "metrics.jsonl")
    single = metrics.read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    for step in multi:
        np.testing.assert_allclose(multi[step]["loss"], single[step]["loss"], rtol=1e-6)
        np.testing.assert_allclose(multi[step]["grad_norm"], single[step]["grad_norm"], rtol=1e-6)


def _restore_all(workdir, config, step):
    """(state, data state) of a 2-process checkpoint, restored on this process's 8 devices."""
    manager = Checkpointer(Path(workdir) / "checkpoints").manager
    target = toy_task.make_task(config).init_state(jax.random.key(9))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return jax.device_get(restored["state"]), restored["data"]


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path, straight):
    """SIGTERM reaches process 1 only (after step 3): both finish step 3, save it, exit 0; the
    rerun resumes from it and ends bit for bit where an uninterrupted 2-process run ends."""
    steps = STEPS
    stopped = run_two_processes(tmp_path / "run", steps,
                                only_process_1=("--config.train.debug.sigterm_at_step=3",))
    for code, out in stopped:
        assert code == 0, out[-3000:]
        assert "preempted at step 3" in out, out[-3000:]
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [2, 3]
    resumed = run_two_processes(tmp_path / "run", steps)
    for code, out in resumed:
        assert code == 0, out[-3000:]
    assert "(step 3)" in resumed[0][1]  # process 0 logs the resume

    a = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    b = metrics.read_jsonl(straight / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]
    config = load_config(TOY)
    config.train.update(dict(num_steps=steps, progress_bar=False))
    ours, our_data = _restore_all(tmp_path / "run", config, steps)
    theirs, their_data = _restore_all(straight, config, steps)
    assert our_data == their_data == {"process_0": {"index": steps},
                                      "process_1": {"index": steps}}
    assert int(ours.step) == int(theirs.step) == steps
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
