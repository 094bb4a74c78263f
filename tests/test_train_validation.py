"""train.py's input: --help, positional arguments, the whole config checked before any work (every
stage of the default run, sampling included), a --workdir that is a file, and a finished run that
is reported and left untouched. The task factories here fail the test if any work starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import toy_regression_config, toy_task
from support.toy_task import TOY_TASKS

from ldm_jax.cli import train as train_cli
from ldm_jax.training import config_checks, default_task, loop, setup
from ldm_jax.training.config_overrides import load_config
from ldm_jax.training.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")
TOY = toy_regression_config.PATH
SMALL = ["--config.train.num_steps=4", "--config.train.log_every=1",
         "--config.train.checkpoint_every=2", "--config.train.progress_bar=False"]


def _no_work(config):
    raise AssertionError("the run started although its input is bad or the run is finished")


NO_WORK = {**TOY_TASKS, "default": _no_work}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _snapshot(folder: Path) -> dict:
    """path -> (bytes, mtime_ns) of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_help_prints_the_flags_and_the_config_docstring():
    """Through the real `python train.py` (absl used to answer 'Unknown command line flag')."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for flag in ("--help", "-h"):
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), flag], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--workdir" in result.stdout and "--config.KEY=VALUE" in result.stdout
        assert "The built-in default: `python train.py`" in result.stdout  # configs/default.py


def test_help_shows_the_given_config_files_docstring(capsys):
    assert train_cli.main(["train.py", "--config", TOY, "--help"], tasks=NO_WORK) == 0
    assert "Test scaffolding: a tiny linear-regression run" in capsys.readouterr().out


def test_a_positional_argument_is_an_error_not_the_default_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run's workdir (runs/default) would land here
    assert train_cli.main(["train.py", f"{DEFAULT}:ci"], tasks=NO_WORK) == 2
    assert "unexpected argument" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.num_steps=-5", "train.num_steps=-5 must be >= 1"),
        ("--config.train.num_steps=0", "train.num_steps=0 must be >= 1"),
        ("--config.data.global_batch_size=0", "data.global_batch_size=0 must be >= 1"),
        ("--config.first_stage.train.num_steps=0", "first_stage.train.num_steps=0 must be >= 1"),
        ("--config.first_stage.global_batch_size=-1", "first_stage.global_batch_size=-1"),
        # stage 2's sampling settings: once found only after both stages had trained
        ("--config.sample.sampler=k_lms", "unknown sampler 'k_lms'"),
        ("--config.sample.steps=0", "sample.steps=0 must be >= 1"),
        ("--config.sample.guidance=nan", "sample.guidance must be a finite number, got nan"),
        ("--config.sample.guidance=inf", "sample.guidance must be a finite number, got inf"),
    ],
)
def test_the_default_runs_config_is_checked_before_any_work(tmp_path, capsys, override, message):
    argv = ["train.py", f"--config={DEFAULT}:ci", "--workdir", str(tmp_path / "run"), override]
    assert train_cli.main(argv, tasks=NO_WORK) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_the_default_run_checks_both_stages_when_built_directly():
    """The API path (default_task.make_task) refuses stage 2's bad sampler before stage 1 runs."""
    config = load_config(DEFAULT, "ci")
    config.sample.sampler = "k_lms"
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'"):
        default_task.make_task(config)


def test_the_cli_sampler_alias_is_a_config_sampler_name():
    """`dpm++` (sample.py's name) is accepted in a config and means dpm_solver."""
    config = load_config(DEFAULT, "ci")
    config.sample.sampler = "dpm++"
    config_checks.check_config(config)
    assert config_checks.sampler_name("dpm++") == "dpm_solver"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.data.global_batch_size=0", "data.global_batch_size=0 must be >= 1"),
        ("--config.train.num_steps=-5", "train.num_steps=-5 must be >= 1"),
    ],
)
def test_toy_trainer_bad_counts_write_nothing(tmp_path, capsys, override, message):
    argv = ["train.py", "--config", TOY, "--workdir", str(tmp_path / "run"), *SMALL, override]
    assert train_cli.main(argv, tasks=TOY_TASKS) == 2
    line = _one_error_line(capsys)
    assert message in line and "divisible" not in line
    assert not (tmp_path / "run").exists()


def test_the_loop_checks_its_config_before_reading_data_or_writing(tmp_path):
    config = load_config(TOY)
    config.train.num_steps = 0
    with pytest.raises(loop.SetupError, match="train.num_steps=0 must be >= 1"):
        loop.run(config, tmp_path / "run", toy_task.make_task(config))
    assert not (tmp_path / "run").exists()


def test_zero_global_batch_is_not_called_indivisible():
    with pytest.raises(ValueError, match="global_batch_size=0 must be >= 1") as info:
        setup.check_global_batch(0, make_mesh(("data", "fsdp", "tensor"), (1, -1, 1)))
    assert "divisible" not in str(info.value)


@pytest.mark.parametrize("below", ["", "sub"])
def test_workdir_that_is_a_file_is_one_error_line(tmp_path, capsys, below):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    workdir = file / below if below else file
    argv = ["train.py", "--config", TOY, "--workdir", str(workdir), *SMALL]
    assert train_cli.main(argv, tasks=NO_WORK) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [file]


@pytest.mark.parametrize("config, message", [
    (f"{DEFAULT}:foo", "unknown configs/default.py argument 'foo'"),
    (str(ROOT / "README.md"), "is not a Python file"),
])
def test_bad_config_argument_is_one_error_line(tmp_path, capsys, config, message):
    argv = ["train.py", f"--config={config}", "--workdir", str(tmp_path / "run")]
    assert train_cli.main(argv, tasks=NO_WORK) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train.py", "--config", TOY, "--workdir", str(workdir), *SMALL]
    assert train_cli.main(argv, tasks=TOY_TASKS) == 0
    before = _snapshot(workdir)
    capsys.readouterr()
    # the same run with another learning rate: config.json must keep what was trained
    assert train_cli.main([*argv, "--config.optimizer.learning_rate=0.5"], tasks=NO_WORK) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "already complete" in out[0] and "step 4" in out[0], out
    assert _snapshot(workdir) == before


def _finished_default_run(workdir: Path) -> None:
    """The files a finished default run (default.py:ci, 2 steps per stage) leaves."""
    for stage in ("autoencoder", "ldm"):
        (workdir / stage / "checkpoints" / "2").mkdir(parents=True)
        (workdir / stage / "config.json").write_text("{}")
    (workdir / "model").mkdir()
    (workdir / "model" / "weights").write_text("trained")
    (workdir / "samples.png").write_bytes(b"png")


def test_a_finished_default_run_is_not_re_exported_or_re_sampled(tmp_path, capsys):
    workdir = tmp_path / "run"
    _finished_default_run(workdir)
    before = _snapshot(workdir)
    argv = ["train.py", f"--config={DEFAULT}:ci", "--workdir", str(workdir),
            "--config.sample.guidance=2.0"]
    assert train_cli.main(argv, tasks=NO_WORK) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "already complete" in out[0], out
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("missing", ["samples.png", "model", "ldm/checkpoints/2"])
def test_an_unfinished_default_run_is_not_complete(tmp_path, missing):
    import shutil  # noqa: PLC0415

    _finished_default_run(tmp_path)
    target = tmp_path / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert not default_task.is_complete(load_config(DEFAULT, "ci"), tmp_path)
