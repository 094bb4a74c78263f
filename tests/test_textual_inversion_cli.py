"""sample.py --textual-inversion PATH[:TOKEN] (tiny SD 1.x folder)."""

import json

import numpy as np
import pytest
from PIL import Image
from support.ti_files import random_embedding, write_a1111_pt, write_a1111_safetensors
from support.tiny_pipelines import TEXT_WIDTH, sd_pipeline

from ldm_jax.cli import sample as sampling_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti-cli") / "sd"
    sd_pipeline().save_pretrained(folder)
    return folder


def test_cli_flag(folder, tmp_path, capsys):
    """--textual-inversion PATH:TOKEN changes the images and is recorded; a bad embedding is one
    error line, exit 2, nothing written; the cached pipeline is left without it."""
    path = write_a1111_pt(tmp_path / "style.pt", random_embedding(2, TEXT_WIDTH, 5), "style")
    wide = write_a1111_safetensors(tmp_path / "sd2.safetensors", random_embedding(1, 1024))

    def run(out, *extra):
        argv = ["--checkpoint", str(folder), "--prompt", "a <s> cat", "--steps", "2", "--n", "1",
                "--seed", "3", "--no-progress", "--out", str(tmp_path / out), *extra]  # fmt: skip
        return sampling_cli.main(argv)

    assert run("plain") == 0 and run("ti", "--textual-inversion", f"{path}:<s>") == 0
    image = Image.open(tmp_path / "ti" / "00.png")
    assert json.loads(image.info["parameters"])["textual_inversion"] == [f"{path}:<s>"]
    plain = np.asarray(Image.open(tmp_path / "plain" / "00.png"))
    assert not np.array_equal(np.asarray(image), plain)
    capsys.readouterr()
    assert run("bad", "--textual-inversion", str(wide)) == 2
    assert "width 1024 does not fit" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    assert run("empty", "--textual-inversion", f"{path}: ") == 2
    assert run("again", "--textual-inversion", f"{path}:<s>") == 0  # unloaded after each run
