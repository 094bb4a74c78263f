"""`python -m ldm_jax.convert`: converts, and on bad input exits non-zero having written nothing."""

import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from support.tiny_specs import SD1_LIKE, random_params

from ldm_jax.checkpoints import load_checkpoint
from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table


def _convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "ldm_jax.convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def compvis_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "sd.safetensors"
    params = random_params(SD1_LIKE)
    safetensors.numpy.save_file(compvis_checkpoint_table(SD1_LIKE).to_torch(params), str(path))
    return path


def test_converts_compvis_to_diffusers(compvis_file, tmp_path):
    result = _convert(compvis_file, tmp_path / "sd", "--to", "diffusers", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "wrote diffusers checkpoint" in result.stdout
    converted = load_checkpoint(tmp_path / "sd")
    original = load_checkpoint(compvis_file)
    kernel = converted.params["unet"]["conv_in"]["kernel"]
    assert kernel.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(original.params["unet"]["conv_in"]["kernel"], kernel.dtype)
    )


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(compvis_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(compvis_file.read_bytes()[:-1000])
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = {
        "no such file": [tmp_path / "missing.safetensors", tmp_path / "a", "--to", "orbax"],
        "truncated": [truncated, tmp_path / "b", "--to", "orbax"],
        "exists": [compvis_file, existing, "--to", "orbax"],
    }
    for expected, args in cases.items():
        result = _convert(*args)
        assert result.returncode == 2, (expected, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert expected.split()[-1] in lines[0].lower() or expected == "truncated", lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "truncated.safetensors"]
    assert list(existing.iterdir()) == []


def test_usage_errors_exit_2(tmp_path):
    result = _convert("a", "b", "--to", "onnx")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_help_explains_every_format(capsys):
    from ldm_jax.cli import convert as convert_cli  # noqa: PLC0415

    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for what in ("compvis (one .safetensors file)", "diffusers (a pipeline folder)",
                 "orbax (an ldm_jax folder"):
        assert what in text
