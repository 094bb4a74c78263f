"""sample.py's CLI run in-process on a tiny random SD pipeline: files, grid, progress, bad input."""

import json

import pytest
from PIL import Image
from support.tiny_pipelines import sd_pipeline

import ldm_jax.sampling.progress
from ldm_jax.cli import common
from ldm_jax.cli import sample as sampling_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SD1-style diffusers folder: v_prediction, VAE factor 2, 16x16 images."""
    folder = tmp_path_factory.mktemp("sample-cli") / "tiny-sd"
    sd_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def progress_bars(monkeypatch):
    """Every StepProgress the CLI creates, so a test can read the steps it was told about."""
    bars = []

    class Recording(ldm_jax.sampling.progress.StepProgress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(ldm_jax.sampling.progress, "StepProgress", Recording)
    return bars


def _error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


def test_writes_images_grid_and_reports_every_step(tiny, tmp_path, capsys, progress_bars):
    out = tmp_path / "out"
    long_prompt = "a photo of a cat " * 30
    argv = ["--checkpoint", tiny, "--prompt", long_prompt, "--steps", "2", "--out", str(out)]
    assert sampling_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "warning: --prompt is" in captured.err and "reads 77" in captured.err
    assert f"to {out}/" in captured.out
    names = ["00.png", "01.png", "02.png", "03.png", "grid.png"]
    assert sorted(p.name for p in out.iterdir()) == names  # staging folder removed
    images = [Image.open(out / name) for name in names[:4]]
    assert all(image.size == (16, 16) and image.mode == "RGB" for image in images)
    grid = Image.open(out / "grid.png")
    assert grid.size == (32, 32)  # 4 images: 2 x 2
    assert grid.crop((16, 16, 32, 32)).tobytes() == images[3].tobytes()
    assert '"sampler": "ddim"' in grid.info["parameters"]
    # no --seed: a fresh one, printed; each PNG records its own (image i: seed + i)
    seeds = [json.loads(image.info["parameters"])["seed"] for image in images]
    assert seeds == [(seeds[0] + i) % 2**32 for i in range(4)]
    assert json.loads(grid.info["parameters"])["seeds"] == seeds
    assert f"seeds: {seeds[0]} ... {seeds[3]}" in captured.out
    (bar,) = progress_bars
    assert bar.total == 2 and bar.steps == [0, 1] and bar.bar.n == 2

    # the same names again: refused, nothing touched; --overwrite replaces them
    before = (out / "grid.png").stat().st_mtime_ns
    assert sampling_cli.main(argv) == 2
    errors, _ = _error_lines(capsys)
    assert len(errors) == 1 and "--overwrite" in errors[0]
    assert (out / "grid.png").stat().st_mtime_ns == before
    assert sampling_cli.main([*argv, "--overwrite"]) == 0  # the same shapes: no recompilation
    assert sorted(p.name for p in out.iterdir()) == names
    assert (out / "grid.png").stat().st_mtime_ns > before


def test_dpm_solver_size_and_odd_batch(tiny, tmp_path, progress_bars):
    out = tmp_path / "out"
    argv = ["--checkpoint", tiny, "--prompt", "a harbour", "--negative-prompt", "blurry"]
    argv += ["--sampler", "dpm++", "--n", "3", "--steps", "2", "--height", "8", "--width", "16"]
    argv += ["--attention", "blocked", "--guidance-rescale", "0.7"]
    assert sampling_cli.main([*argv, "--guidance", "1.0", "--out", str(out)]) == 0
    pipe = common.load_pipeline(tiny, "float32", None, "blocked")  # the one just used (cached)
    assert {m.attention_implementation for m in pipe.modules.values()} == {"blocked"}
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "02.png", "grid.png"]
    assert Image.open(out / "00.png").size == (16, 8)  # PIL: (width, height)
    assert Image.open(out / "grid.png").size == (32, 16)  # 3 images: 2 columns, 2 rows
    assert progress_bars[0].steps == [0, 1]


BAD_INPUTS = {
    "no checkpoint": ([], "--checkpoint is required"),
    "unknown sampler": (
        ["--sampler", "k_lms"],
        "choose from 'ddim', 'ddpm', 'plms', 'dpm_solver', 'dpm++_2m_karras'",
    ),
    "unknown attention": (["--attention", "flash"], "choose from 'auto', 'xla', 'cudnn'"),
    "rescale above 1": (["--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1]"),
    "zero steps": (["--steps", "0"], "--steps must be >= 1"),
    "zero images": (["--n", "0"], "--n must be >= 1"),
    "height not divisible": (["--height", "15"], "not a multiple of 2"),
    "plms on a v-model": (["--sampler", "plms"], "needs an epsilon model"),
    "missing checkpoint": (["--checkpoint", "nowhere/model.safetensors"], "not found"),
    "missing init image": (["--init-image", "cat.png"], "--init-image cat.png is not a file"),
    "strength without image": (["--strength", "0.5"], "--strength needs --init-image"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(case, tiny, tmp_path, capsys, monkeypatch):
    extra, message = BAD_INPUTS[case]
    # the default model is relative to the working directory: a real runs/default/model in the
    # checkout must not turn "no checkpoint" into a run
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    checkpoint = [] if case == "no checkpoint" else ["--checkpoint", tiny]
    argv = [*checkpoint, "--prompt", "a cat", "--steps", "2", "--out", str(out), *extra]
    assert sampling_cli.main(argv) == 2
    errors, err = _error_lines(capsys)
    assert len(errors) == 1 and message in errors[0], err
    assert not out.exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sampling_cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--negative-prompt", "--n", "--steps", "--sampler", "--guidance"):
        assert flag in text
    for flag in ("--seed", "--height", "--width", "--out", "--dtype", "--compilation-cache",
                 "--attention", "--guidance-rescale"):
        assert flag in text
    assert "dpm++" in text
    for flag in ("--init-image", "--strength", "--mask", "--class-label", "--low-res-image"):
        assert flag in text
