"""The built-in default run (`python train.py`, configs/default.py) end to end at CI sizes, then
`python sample.py --prompt ...` with no --checkpoint picking up its model."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from support import toy_regression_config, toy_task

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.cli import sample as sampling_cli
from ldm_jax.cli import train as train_cli
from ldm_jax.training import default_task, loop
from ldm_jax.training.config_overrides import load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.py"


def _train_script():
    """train.py, the thin script: its main is the train CLI's."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is train_cli.main
    return module


def test_train_py_without_config_uses_the_default_config():
    assert train_cli.DEFAULT_CONFIG == DEFAULT
    config = load_config(str(DEFAULT))
    assert config.trainer == "default" and config.workdir_default == "runs/default"
    # offline: no LPIPS weights; left/right captions must not be flipped
    assert config.first_stage.loss.perceptual_weight == 0 and not config.data.flip
    run = default_task.make_task(config)
    assert run.spec.cond_stage.kind == "clip" and run.spec.cond_stage.trainable
    assert run.spec.diffusion.latent_size * run.spec.first_stage.downsample_factor == 32
    first, second = run.first_config, run.ldm_config
    assert (first.trainer, second.trainer) == ("autoencoder", "ldm")
    assert first.data.global_batch_size == config.first_stage.global_batch_size
    assert first.train.num_steps == config.first_stage.train.num_steps != second.train.num_steps


def test_bad_default_configs_are_one_clear_error():
    with pytest.raises(ValueError, match="allowed: 'ci'"):
        load_config(str(DEFAULT), "fast")
    config = load_config(str(DEFAULT), "ci")
    del config["first_stage"]
    with pytest.raises(ValueError, match="config.first_stage"):
        default_task.make_task(config)


def test_sample_py_without_a_default_model_says_to_run_train_py(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sampling_cli.main(["--prompt", "a red circle", "--out", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `python train.py` first" in err[0], err
    assert not (tmp_path / "out").exists()


def test_final_state_is_the_last_step_or_else_the_last_checkpoint(tmp_path):
    """What the default run exports from: loop.run's state, also on a rerun of a finished stage."""
    config = load_config(toy_regression_config.PATH)
    config.train.update(dict(num_steps=4, log_every=1, checkpoint_every=0, progress_bar=False))
    result = loop.run(config, tmp_path, toy_task.make_task(config))
    trained = jax.device_get(result.state.params)
    assert int(result.state.step) == 4
    # a rerun of the finished run takes no step: the state comes from its checkpoint
    again = loop.run(config, tmp_path, toy_task.make_task(config))
    restored = again.state
    assert again.step == 4 and int(restored.step) == 4
    for a, b in zip(_leaves(trained), _leaves(restored.params), strict=True):
        np.testing.assert_array_equal(a, b)
    fresh = toy_task.make_task(config).init_state(jax.random.key(0))
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(trained), _leaves(fresh.params),
                                                         strict=True))


def test_default_run_end_to_end_then_sample_py(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default workdir runs/default lands here
    assert _train_script().main(["train.py", f"--config={DEFAULT}:ci"]) == 0
    out = capsys.readouterr().out
    workdir = tmp_path / "runs" / "default"
    assert 'next: python sample.py --prompt "' in out  # default workdir: no --checkpoint needed
    for stage in ("autoencoder", "ldm"):  # both loops ran to their last step and saved it
        assert (workdir / stage / "checkpoints" / "2").is_dir()
    # each stage labelled, its compile time said once; no MFU line on CPU
    assert out.count("stage 1/2: autoencoder: compiled in") == 1
    assert out.count("stage 2/2: ldm: compiled in") == 1 and "MFU" not in out

    model = LatentDiffusionCheckpoint.from_pretrained(str(workdir / "model"))
    first = LatentDiffusionCheckpoint.from_pretrained(str(workdir / "first_stage"))
    assert set(model.params) == {"unet", "first_stage", "cond_stage"}
    assert first.spec.unet is None and first.spec.first_stage == model.spec.first_stage
    # the LDM trained on the exported first stage, frozen: the final model holds it unchanged
    for a, b in zip(_leaves(model.params["first_stage"]), _leaves(first.params["first_stage"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    scale = model.spec.diffusion.scale_factor  # measured from the first batch (scale_by_std)
    assert scale > 0 and scale != pytest.approx(1.0) and scale != pytest.approx(0.18215)
    assert model.tokenizer.max_length == model.spec.cond_stage.config.max_length == 16
    grid = np.asarray(Image.open(workdir / "samples.png"))
    assert grid.shape == (64, 64, 3)  # 4 images of 32 px, 2 x 2
    # the stages' grids in their samples/ (README): stage 1's reconstructions, stage 2's EMA grid
    assert [p.name for p in (workdir / "autoencoder" / "samples").iterdir()] == [
        "samples_00000002.png"]
    stage_grid = workdir / "ldm" / "samples" / "samples_00000002.png"
    assert stage_grid.read_bytes() == (workdir / "samples.png").read_bytes()

    # the same command again: the run is complete; no re-export, re-sampling or new config.json
    before = _snapshot(workdir)
    assert train_cli.main(["train.py", f"--config={DEFAULT}:ci", "--config.seed=1"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert _snapshot(workdir) == before

    samples = tmp_path / "samples"
    argv = ["--prompt", "a red circle", "--n", "1", "--steps", "2", "--out", str(samples),
            "--no-progress"]
    assert sampling_cli.main(argv) == 0
    assert Image.open(samples / "00.png").size == (32, 32)


def _snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]
