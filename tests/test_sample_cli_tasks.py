"""sample.py's task flags (--init-image/--strength, --mask, --class-label, --low-res-image) on
tiny random diffusers folders: what they write, and one clear error (exit 2, nothing written)
for every misuse."""

import numpy as np
import pytest
from PIL import Image
from support.tiny_pipelines import ldm_pipeline, sd_inpaint_pipeline, sd_pipeline

from ldm_jax.cli import sample as sampling_cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample-tasks")
    makers = {"sd": sd_pipeline, "inpaint": sd_inpaint_pipeline, "ldm": ldm_pipeline}
    for name, make in makers.items():
        make().save_pretrained(root / name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "image.png")
    Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(root / "tall.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:8]).save(root / "small_mask.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def _run(argv, capsys):
    code = sampling_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


def test_img2img_writes_images_of_the_init_image_size(folders, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", folders / "sd", "--prompt", "a cat", "--init-image",
            folders / "tall.png", "--strength", "0.5", "--steps", "4", "--n", "1",
            "--out", out]  # fmt: skip
    code, errors, err = _run(argv, capsys)
    assert code == 0, err
    assert Image.open(out / "00.png").size == (16, 24)  # (width, height) of tall.png
    assert '"strength": 0.5' in Image.open(out / "00.png").info["parameters"]


def test_unconditional_needs_no_prompt(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, errors, err = _run(
        ["--checkpoint", folders / "ldm", "--n", "2", "--steps", "2", "--out", out], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "grid.png"]


BAD = {
    "strength above 1": ("sd", ["--init-image", "image.png", "--strength", "1.5"],
                         "--strength must be in (0, 1], got 1.5"),
    "strength leaves no step": ("sd", ["--init-image", "image.png", "--strength", "0.1"],
                                "leaves no denoising step"),
    "init image size": ("sd", ["--init-image", "image.png", "--height", "24"],
                        "--init-image is 16x16 pixels (width x height) but 16x24 is needed"),
    "unreadable image": ("sd", ["--init-image", "broken.png"], "is not a readable image"),
    "mask on a text-to-image model": ("sd", ["--init-image", "image.png", "--mask", "mask.png"],
                                      "--mask needs an inpainting checkpoint"),
    "class label on a text model": ("sd", ["--class-label", "3"], "--class-label does not apply"),
    "low-res image on a text model": ("sd", ["--low-res-image", "image.png"],
                                      "--low-res-image needs a super-resolution checkpoint"),
    "mask without image": ("inpaint", ["--mask", "mask.png"], "--mask needs --init-image"),
    "inpainting without mask": ("inpaint", ["--init-image", "image.png"],
                                "--init-image and --mask are required"),
    "mask size mismatch": ("inpaint", ["--init-image", "image.png", "--mask", "small_mask.png"],
                           "--mask is 16x8 pixels"),
    "prompt on an unconditional model": ("ldm", [], "--prompt/--negative-prompt do not apply"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_task_misuse_exits_2_and_writes_nothing(case, folders, tmp_path, capsys, monkeypatch):
    model, extra, message = BAD[case]
    monkeypatch.chdir(folders)  # relative image names
    out = tmp_path / "out"
    argv = ["--checkpoint", folders / model, "--steps", "5", "--out", out, *extra]
    if case != "mask without image":
        argv += ["--prompt", "a cat"]
    code, errors, err = _run(argv, capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert not out.exists()
