"""The CLIs' shared scaffolding (ldm_jax/cli/common.py) and their entry points: the documented
commands and the installed console scripts answer --help (0) and a bad argument (one ``error:``
line, exit 2)."""

import configparser
import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

import ldm_jax.diffusion
import ldm_jax.sampling.pipeline
from ldm_jax import sampler_options
from ldm_jax.cli import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sampler_names_are_the_librarys():
    # --sampler's order: the canonical names, then the aliases; each means a library sampler
    names = list(common.SAMPLERS)
    assert names[:4] == ["ddim", "ddpm", "plms", "dpm_solver"]
    assert names == [*sampler_options.SAMPLER_NAMES, *sampler_options.SAMPLER_ALIASES]
    assert common.SAMPLERS["dpm++"] == common.SAMPLERS["dpm_solver"] == "dpm_solver"
    assert set(common.SAMPLERS.values()) == set(ldm_jax.diffusion.SAMPLERS)
    for name in common.SAMPLERS:
        assert ldm_jax.diffusion.SAMPLERS[name] is ldm_jax.diffusion.SAMPLERS[common.SAMPLERS[name]]


def test_usage_errors_are_one_line_and_exit_2(capsys):
    parser = common.Parser(prog="demo")
    parser.add_argument("--n", type=int, required=True)

    def command(args):
        if args.n < 1:
            raise common.UsageError(f"--n must be >= 1, got {args.n}")
        return common.EXIT_OK

    assert common.run_command(parser, command, ["--n", "3"]) == 0
    for argv, message in ((["--n", "x"], "invalid int value"), (["--n", "0"], "--n must be")):
        assert common.run_command(parser, command, argv) == common.EXIT_BAD_INPUT == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_checkpoint_checks(tmp_path):
    (tmp_path / "model.safetensors").touch()
    assert common.exists_or_hub_id(str(tmp_path / "model.safetensors"))
    assert common.exists_or_hub_id("stabilityai/stable-diffusion-2-1-base")
    for missing in ("nowhere/model.safetensors", "./org/name", "a/b/c", "org/", "name"):
        assert not common.exists_or_hub_id(missing), missing
    common.require_checkpoint("org/name", hint="pass a folder")
    with pytest.raises(common.UsageError, match="checkpoint 'org/name' not found: pass a folder"):
        common.require_checkpoint("org/name", hint="pass a folder", hub_ids=False)


def test_pipeline_cache_is_keyed_by_checkpoint_dtype_cache_and_attention(monkeypatch):
    loads = []

    def from_pretrained(path, dtype, compilation_cache_dir, **kwargs):
        if path == "broken":
            raise ValueError("no model_index.json")
        loads.append((path, dtype.__name__, compilation_cache_dir, kwargs["attention"]))
        return object()

    monkeypatch.setattr(
        ldm_jax.sampling.pipeline.LatentDiffusionPipeline, "from_pretrained", from_pretrained
    )
    common._cached_pipeline.cache_clear()
    try:
        first = common.load_pipeline("model")
        assert common.load_pipeline("model", "float32", None) is first  # one key however passed
        assert common.load_pipeline("model", "bfloat16") is not first
        common.load_pipeline("model", "bfloat16", "cache")
        common.load_pipeline("model", "bfloat16", "cache", "blocked")
        assert loads == [
            ("model", "float32", None, "auto"),
            ("model", "bfloat16", None, "auto"),
            ("model", "bfloat16", "cache", "auto"),
            ("model", "bfloat16", "cache", "blocked"),
        ]
        with pytest.raises(common.UsageError, match="cannot load checkpoint 'broken': no model"):
            common.load_pipeline("broken")
    finally:
        common._cached_pipeline.cache_clear()  # no fake pipeline for later tests


def test_pipeline_cache_sees_other_folders_and_retrained_models(monkeypatch, tmp_path):
    """The same relative name in another working folder, or a model rewritten in place, is
    another checkpoint: never the cached pipeline of the old one."""
    loads = []

    def from_pretrained(path, **kwargs):
        loads.append(path)
        return object()

    monkeypatch.setattr(
        ldm_jax.sampling.pipeline.LatentDiffusionPipeline, "from_pretrained", from_pretrained
    )
    for run in ("a", "b"):
        (tmp_path / run / "runs" / "model").mkdir(parents=True)
    common._cached_pipeline.cache_clear()
    try:
        monkeypatch.chdir(tmp_path / "a")
        first = common.load_pipeline("runs/model")
        assert common.load_pipeline("runs/model") is first
        monkeypatch.chdir(tmp_path / "b")
        assert common.load_pipeline("runs/model") is not first
        (tmp_path / "b" / "runs" / "model" / "new_file").write_text("retrained")
        os.utime(tmp_path / "b" / "runs" / "model", ns=(1, 1))  # surely another mtime
        common.load_pipeline("runs/model")
        assert loads == [str(tmp_path / run / "runs" / "model") for run in ("a", "b", "b")]
    finally:
        common._cached_pipeline.cache_clear()


DOCUMENTED = {  # README's commands -> a bad argument for each
    "python sample.py": ([sys.executable, str(ROOT / "sample.py")], ["--sampler", "k_lms"]),
    "python -m ldm_jax.convert": ([sys.executable, "-m", "ldm_jax.convert"], ["a", "b"]),
    "python -m ldm_jax.eval.adherence": (
        [sys.executable, "-m", "ldm_jax.eval.adherence"],
        ["--n", "x"],
    ),
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_documented_commands_help_and_bad_argument(name):
    command, bad = DOCUMENTED[name]
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith(f"usage: {name} "), helped.stderr
    failed = subprocess.run([*command, *bad], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error: "), failed.stderr


def _console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_console_scripts_are_installed_and_answer_help(capsys):
    scripts = _console_scripts()
    assert {"ldm-jax-sample", "ldm-jax-convert", "ldm-jax-adherence"} <= set(scripts)
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    for name, target in scripts.items():
        assert name in installed and installed[name].value == target, (
            f"{name} is not installed as {target}: run `pip install -e .`"
        )
        main = installed[name].load()
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: "), name


def test_console_script_exits_with_mains_status():
    script = pathlib.Path(sys.executable).parent / "ldm-jax-convert"
    assert script.exists(), "run `pip install -e .` to install the console scripts"
    helped = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: ldm-jax-convert ")
    failed = subprocess.run([script, "a", "b", "--to", "onnx"], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.startswith("error: argument --to")
    assert failed.stderr.count("\n") == 1, failed.stderr
