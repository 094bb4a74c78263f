"""sample.py --lora PATH[:SCALE]: merged adapters change the images, scale 0 gives the plain ones,
and bad values or files are one error line with nothing written."""

import json

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image
from support.lora_files import random_factors, write_kohya, write_peft
from support.tiny_pipelines import sd_pipeline

from ldm_jax.cli import sample as sampling_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-cli")
    pipe = sd_pipeline()
    pipe.save_pretrained(root / "tiny-sd")
    write_kohya(root / "kohya.safetensors", random_factors(pipe, 0))
    write_peft(root / "peft.safetensors", random_factors(pipe, 1, ranks=(2,)),
               {"unet": 4.0, "text_encoder": 1.0})  # fmt: skip
    sdxl = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 8))}
    safetensors.numpy.save_file(sdxl, str(root / "sdxl.safetensors"))
    return root


def _run(tiny, out, *extra) -> int:
    argv = ["--checkpoint", str(tiny / "tiny-sd"), "--prompt", "a cat", "--steps", "2", "--n",
            "1", "--seed", "3", "--no-progress", "--out", str(out), *extra]  # fmt: skip
    return sampling_cli.main(argv)


def _image(out) -> tuple[np.ndarray, dict]:
    image = Image.open(out / "00.png")
    return np.asarray(image), json.loads(image.info["parameters"])


def test_lora_flags_change_the_images(tiny, tmp_path):
    kohya, peft = str(tiny / "kohya.safetensors"), str(tiny / "peft.safetensors")
    assert _run(tiny, tmp_path / "plain") == 0
    assert _run(tiny, tmp_path / "lora", "--lora", f"{kohya}:0.8", "--lora", peft) == 0
    assert _run(tiny, tmp_path / "zero", "--lora", f"{kohya}:0") == 0
    plain, _ = _image(tmp_path / "plain")
    with_lora, metadata = _image(tmp_path / "lora")
    zero, _ = _image(tmp_path / "zero")
    assert metadata["lora"] == [f"{kohya}:0.8", f"{peft}:1"]
    assert np.abs(with_lora.astype(int) - plain).max() > 20
    np.testing.assert_array_equal(zero, plain)


@pytest.mark.parametrize(
    "value, message",
    [
        ("missing.safetensors", "--lora missing.safetensors is not a file"),
        ("{kohya}:x", "SCALE must be a number, got 'x'"),
        ("{kohya}:nan", "SCALE must be finite"),
        ("{sdxl}", "name no layer of this model"),
    ],
)
def test_bad_lora_values(tiny, tmp_path, capsys, value, message):
    value = value.format(kohya=tiny / "kohya.safetensors", sdxl=tiny / "sdxl.safetensors")
    out = tmp_path / "out"
    assert _run(tiny, out, "--lora", value) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_lora_given_twice(tiny, tmp_path, capsys):
    kohya = str(tiny / "kohya.safetensors")
    assert _run(tiny, tmp_path / "out", "--lora", kohya, "--lora", f"{kohya}:0.5") == 2
    assert "given twice" in capsys.readouterr().err
