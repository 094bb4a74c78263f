"""Bad sampling input is one error before any work: the shared checks (ldm_jax.sampler_options),
the one sampler vocabulary, and sample.py / the adherence CLI refusing it before a model loads."""

import math
import subprocess
import sys

import numpy as np
import pytest

import ldm_jax.diffusion
from ldm_jax import sampler_options
from ldm_jax.cli import adherence as adherence_cli
from ldm_jax.cli import common
from ldm_jax.cli import sample as sampling_cli
from ldm_jax.sampler_options import (
    MAX_SEED,
    canonical_sampler,
    check_eta,
    check_guidance,
    check_seed,
    check_strength,
)


# --- the shared checks
@pytest.mark.parametrize("value", [0, 1, 7.5, -2.0, np.float32(3)])
def test_guidance_accepts_finite_numbers(value):
    assert check_guidance(value) == float(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), "7.5", None])
def test_guidance_refuses_nan_inf_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"guidance_scale must be a (finite )?number"):
        check_guidance(value)


def test_eta_range():
    assert check_eta(0) == 0.0 and check_eta(1) == 1.0 and check_eta(0.5) == 0.5
    for bad in (math.nan, math.inf, -0.1, 1.01):
        with pytest.raises(ValueError, match="eta must be"):
            check_eta(bad)


def test_strength_range():
    assert check_strength(1) == 1.0 and check_strength(1e-6) == 1e-6
    for bad in (0, -0.5, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="strength must be"):
            check_strength(bad)


def test_seed_edges_are_what_prng_key_distinguishes():
    """PRNGKey keeps only a seed's low 32 bits (JAX's default int32 mode), and overflows past
    int64: every accepted seed gives its own key, and the first refused one would repeat 0's."""
    import jax  # noqa: PLC0415

    assert MAX_SEED == 2**32 - 1
    for seed in (0, 1, MAX_SEED, np.int64(5), np.uint32(MAX_SEED)):
        assert check_seed(seed) == int(seed)
    assert not np.array_equal(jax.random.PRNGKey(MAX_SEED), jax.random.PRNGKey(0))
    if not jax.config.jax_enable_x64:
        assert np.array_equal(jax.random.PRNGKey(MAX_SEED + 1), jax.random.PRNGKey(0))
    for bad in (-1, MAX_SEED + 1, 2**63, 2**70):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32 - 1\]"):
            check_seed(bad)
    for bad in (1.0, True, "3", None):
        with pytest.raises(ValueError, match="seed must be an integer"):
            check_seed(bad)


# --- one sampler vocabulary
def test_one_sampler_vocabulary():
    registry = ldm_jax.diffusion.SAMPLERS
    assert sorted(registry) == sorted(sampler_options.SAMPLER_NAMES)  # iteration: canonical only
    for alias, name in sampler_options.SAMPLER_ALIASES.items():
        assert canonical_sampler(alias) == name
        assert alias in registry and registry[alias] is registry[name] is registry.get(alias)
    for name in sampler_options.SAMPLER_NAMES:
        assert canonical_sampler(name) == name
    assert canonical_sampler("dpm++") == canonical_sampler("dpm++_2m") == "dpm_solver"
    assert canonical_sampler("EulerDiscreteScheduler") == "euler"  # diffusers' class names
    assert "k_lms" not in registry and registry.get("k_lms") is None
    for unknown in ("k_lms", "DDIM", "LMSDiscreteScheduler", None, 3):
        with pytest.raises(ValueError, match="unknown sampler.*ddim, ddpm, plms, dpm_solver"):
            canonical_sampler(unknown)
    with pytest.raises(KeyError, match="aliases: dpm\\+\\+ = dpm_solver"):
        registry["k_lms"]
    # the CLI's table is the library's: every name and alias, each meaning its canonical sampler
    assert common.SAMPLERS == {n: canonical_sampler(n) for n in sampler_options.ALL_SAMPLER_NAMES}
    assert set(common.SAMPLERS.values()) == set(registry)


def test_cli_imports_no_jax():
    """The vocabulary lives outside ldm_jax.diffusion so the CLIs answer --help and bad input
    without importing jax."""
    probe = "import sys, ldm_jax.cli.sample, ldm_jax.cli.adherence; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


# --- sample.py: refused before the model loads, nothing written
@pytest.fixture
def never_loads(monkeypatch):
    def load_pipeline(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(sampling_cli, "load_pipeline", load_pipeline)
    monkeypatch.setattr(adherence_cli, "load_pipeline", load_pipeline)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


SAMPLE_BAD = {
    "guidance nan": (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    "guidance inf": (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
    "guidance overflow": (["--guidance", "1e999"], "--guidance must be a finite number"),
    "guidance -inf": (["--guidance=-inf"], "--guidance must be a finite number"),
    "eta nan": (["--eta", "nan"], "--eta must be a finite number, got nan"),
    "eta negative": (["--eta", "-0.5"], "--eta must be in [0, 1]"),
    "eta above 1": (["--eta", "1.5"], "--eta must be in [0, 1]"),
    "eta for ddpm": (["--eta", "0.5", "--sampler", "ddpm"], "--eta applies to --sampler ddim"),
    "seed negative": (["--seed", "-1"], "--seed must be in [0, 2**32 - 1]"),
    "seed 2**32": (["--seed", str(2**32)], "--seed must be in [0, 2**32 - 1]"),
    "seed 2**70": (["--seed", str(2**70)], "--seed must be in [0, 2**32 - 1]"),
    "strength nan": (["--strength", "nan"], "--strength must be a finite number"),
    "strength 0": (["--strength", "0"], "--strength must be in (0, 1]"),
}


@pytest.mark.parametrize("case", list(SAMPLE_BAD))
def test_sample_bad_numbers(case, tmp_path, capsys, never_loads):
    extra, message = SAMPLE_BAD[case]
    model = tmp_path / "model.safetensors"
    model.touch()
    image = tmp_path / "cat.png"
    image.touch()
    out = tmp_path / "out"
    argv = ["--checkpoint", str(model), "--prompt", "a cat", "--out", str(out), *extra]
    if "--strength" in extra:
        argv += ["--init-image", str(image)]
    assert sampling_cli.main(argv) == 2
    assert message in _one_error(capsys)
    assert not out.exists()


def test_sample_edge_values_pass_the_checks(tmp_path):
    model = tmp_path / "model.safetensors"
    model.touch()
    base = ["--checkpoint", str(model), "--prompt", "a cat", "--out", str(tmp_path / "out")]
    for extra in (
        ["--seed", str(MAX_SEED)],
        ["--seed", "0", "--guidance", "0", "--eta", "1"],
        ["--guidance", "-1", "--sampler", "dpm_solver"],  # the canonical name is accepted too
        ["--sampler", "dpm++", "--eta", "0"],
    ):
        sampling_cli.check_args(sampling_cli.build_parser().parse_args([*base, *extra]))


def test_sample_out_that_cannot_be_a_folder(tmp_path, capsys, never_loads):
    model = tmp_path / "model.safetensors"
    model.touch()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    taken = tmp_path / "taken"
    (taken / "00.png").mkdir(parents=True)  # a folder where an image would go
    cases = {
        str(a_file): "exists and is not a folder",
        str(a_file / "sub"): f"cannot be created: {a_file} is not a folder",
        str(a_file / "sub" / "deeper"): f"cannot be created: {a_file} is not a folder",
        str(taken): "holds folders named 00.png",
    }
    for out, message in cases.items():
        argv = ["--checkpoint", str(model), "--prompt", "a cat", "--out", out, "--overwrite"]
        assert sampling_cli.main(argv) == 2
        assert message in _one_error(capsys), out
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors",
        "notes.txt",
        "taken",
    ]


# --- the adherence CLI: the same rules
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
        (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
        (["--seed", "-1"], "--seed must be in [0, 2**32 - 1]"),
        (["--seed", str(2**70)], "--seed must be in [0, 2**32 - 1]"),
        (["--seed", str(MAX_SEED)], f"--seed must be <= {MAX_SEED - 3} here: image 3 uses"),
        (["--data-seed", "-1"], "--data-seed must be >= 0"),
        (["--sampler", "k_lms"], "invalid choice"),
    ],
)
def test_adherence_bad_numbers(extra, message, capsys, never_loads):
    argv = ["--checkpoint", ".", "--n", "3", "--batch", "2", *extra]
    assert adherence_cli.main(argv) == 2
    assert message in _one_error(capsys)


def test_adherence_outputs_that_cannot_be_written(tmp_path, capsys, never_loads):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    cases = [
        (["--json", str(a_file / "report.json")], "is not a folder"),
        (["--grid", str(tmp_path)], "is a folder; give a file path"),
        (["--grid", str(tmp_path), "--overwrite"], "is a folder; give a file path"),
        (["--json", str(tmp_path / "r"), "--grid", str(tmp_path / "r")], "are the same file"),
    ]
    for extra, message in cases:
        assert adherence_cli.main(["--checkpoint", ".", "--n", "3", *extra]) == 2
        assert message in _one_error(capsys), extra
    assert a_file.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
