"""The train CLI (ldm_jax/cli/train.py, `python train.py`) end to end in subprocesses: a SIGKILLed
run resumes exactly, SIGTERM saves and exits 0, bad input is one `error:` line with exit status 2,
a NaN loss exits 1 without saving. The toy task is test-only: the subprocesses run
support/train_toy.py, the CLI with it registered."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from support import toy_regression_config, toy_task
from support.toy_task import TOY_TASKS

from ldm_jax.cli import train as train_cli
from ldm_jax.training import loop, metrics
from ldm_jax.training.checkpointing import Checkpointer
from ldm_jax.training.config_overrides import load_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TOY = toy_regression_config.PATH
SMALL = ["--config.train.num_steps=6", "--config.train.log_every=1",
         "--config.train.checkpoint_every=3", "--config.train.progress_bar=False"]


def train(workdir, *overrides, devices=8, extra_env=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath(),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, str(TESTS / "support" / "train_toy.py"), "--config", TOY, "--workdir",
         str(workdir),
         *SMALL, *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def pythonpath() -> str:
    """tests/ first (for `support`), then whatever the environment had."""
    return os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)


def reference_run(workdir):
    """The uninterrupted run, in this process (same 8 CPU devices, same XLA)."""
    config = load_config(TOY)
    config.train.update(dict(num_steps=6, log_every=1, checkpoint_every=3, progress_bar=False))
    loop.run(config, workdir, toy_task.make_task(config))
    return config


def restore_params(config, workdir, step):
    state = toy_task.make_task(config).init_state(jax.random.key(1))
    restored, _, _ = Checkpointer(Path(workdir) / "checkpoints").restore(step, state)
    return jax.device_get(restored.params)


def test_sigkilled_run_resumes_exactly(tmp_path):
    killed = train(tmp_path / "run", "--config.train.debug.kill_at_step=5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [3]
    resumed = train(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 3)" in resumed.stdout and "resumed from" in resumed.stdout
    config = reference_run(tmp_path / "straight")
    straight = metrics.read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    interrupted = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = range(1, 7)
    assert [interrupted[s]["loss"] for s in steps] == [straight[s]["loss"] for s in steps]
    a = restore_params(config, tmp_path / "straight", 6)
    b = restore_params(config, tmp_path / "run", 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    result = train(tmp_path, "--config.train.debug.sigterm_at_step=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "preempted at step 2" in result.stdout
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]
    assert sorted(metrics.read_jsonl(tmp_path / "metrics.jsonl")) == [1, 2]


def test_unknown_override_key_is_one_line_exit_2(tmp_path):
    """Through the real `python train.py` (the thin script over ldm_jax.cli.train)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "ldm_tiny.py"),
         "--workdir", str(tmp_path), "--config.optimizer.learning_rat=0.1"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key")
    assert "optimizer.learning_rate" in lines[0]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, status, message",
    [
        ("--config.data.global_batch_size=12", 2, "not divisible by the data-parallel size 8"),
        ("--config.trainer=gan", 2, "unknown config.trainer 'gan'"),
        ("--config.train.num_steps=many", 2, "invalid literal for int()"),
        ("--config.toy.nan_at_step=5", 1, "non-finite training metrics at step 5"),
    ],
)
def test_bad_input_and_nan_exit_codes(tmp_path, capsys, override, status, message):
    argv = ["train.py", "--config", TOY, "--workdir", str(tmp_path), *SMALL, override]
    assert train_cli.main(argv, tasks=TOY_TASKS) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    if status == 1:  # checkpoint 3 was written, 5 (NaN) and 6 never
        assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3]


def test_missing_dataset_is_one_line_exit_2(tmp_path, capsys):
    """The LDM task with a dataset that is not there: reported before anything compiles."""
    (tmp_path / "data").mkdir()
    argv = ["train.py", "--config", str(ROOT / "configs" / "ldm_tiny.py"), "--workdir",
            str(tmp_path / "run"), "--config.data.source=tfds", "--config.data.name=my_images",
            f"--config.data.data_dir={tmp_path / 'data'}", "--config.train.progress_bar=False"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "my_images" in err[-1]
    assert not (tmp_path / "run").exists()  # nothing written
