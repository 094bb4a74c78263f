"""The image-folder TFDS builder: captions from .txt files or metadata.jsonl, read back through
tfds.data_source without TensorFlow; bad folders are one error naming the file."""

import io
import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data.errors import DataError
from ldm_jax.data.image_folder import build_image_folder_dataset, find_examples, main


def _pixels(seed: int, shape=(6, 5, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_folder(root, *, captions="txt"):
    """6 tiny images (RGB PNGs, one RGBA, one grayscale, one in a subfolder) -> expected RGB
    pixels and caption by file name."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    expected = {}
    for i in range(6):
        name = f"sub/img{i}.png" if i == 5 else f"img{i}.png"
        rgb = _pixels(i, (4 + i, 5, 3))
        if i == 3:  # RGBA: the alpha channel is dropped
            Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1), "RGBA").save(root / name)
        elif i == 4:  # grayscale: repeated to RGB
            Image.fromarray(rgb[..., 0], "L").save(root / name)
            rgb = np.repeat(rgb[..., :1], 3, axis=-1)
        else:
            Image.fromarray(rgb).save(root / name)
        expected[name] = (rgb, f"a picture number {i}")
    if captions == "txt":
        for name, (_, caption) in expected.items():
            (root / name).with_suffix(".txt").write_text(caption + "\n")
    else:
        rows = [{"file_name": name, "text": caption} for name, (_, caption) in expected.items()]
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return expected


def read_back(data_dir, name):
    source = tfds.data_source(name, split="train", data_dir=str(data_dir), download=False)
    return {r["file_name"].decode(): (r["image"], r["caption"].decode()) for r in source}


@pytest.mark.parametrize("captions", ["txt", "metadata"])
def test_builder_round_trip_without_tensorflow(tmp_path, captions):
    expected = write_folder(tmp_path / "src", captions=captions)
    path = build_image_folder_dataset(tmp_path / "src", tmp_path / "tfds", name="my_images")
    assert path == tmp_path / "tfds" / "my_images" / "1.0.0"
    assert "tensorflow" not in sys.modules  # read and written with numpy/PIL only
    stored = read_back(tmp_path / "tfds", "my_images")
    assert sorted(stored) == sorted(expected)
    for name, (rgb, caption) in expected.items():
        image, text = stored[name]
        assert text == caption
        assert image.dtype == np.uint8 and image.shape == rgb.shape
        np.testing.assert_array_equal(image, rgb)
    # Only the finished dataset is left: no temporary build folders.
    assert sorted(p.name for p in (tmp_path / "tfds" / "my_images").iterdir()) == ["1.0.0"]


def test_jpeg_kept_as_is_and_exif_rotation_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(_pixels(0, (8, 16, 3))).save(src / "plain.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(_pixels(1, (8, 16, 3))).save(src / "rotated.jpg", exif=exif)
    for stem in ("plain", "rotated"):
        (src / f"{stem}.txt").write_text(stem)
    build_image_folder_dataset(src, tmp_path / "tfds", name="photos")
    stored = read_back(tmp_path / "tfds", "photos")
    with Image.open(src / "plain.jpg") as original:
        np.testing.assert_array_equal(stored["plain.jpg"][0], np.asarray(original))
    assert stored["rotated.jpg"][0].shape == (16, 8, 3)  # displayed (upright) orientation


def test_cli_writes_then_refuses_to_overwrite(tmp_path, capsys):
    write_folder(tmp_path / "src")
    argv = [str(tmp_path / "src"), "--data-dir", str(tmp_path / "tfds"), "--name", "cli_set"]
    assert main(argv) == 0
    assert "6 examples" in capsys.readouterr().out
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "src" / "img0.txt").write_text("a new caption")
    assert main([*argv, "--overwrite"]) == 0
    assert read_back(tmp_path / "tfds", "cli_set")["img0.png"][1] == "a new caption"


def test_unreadable_image_is_named_and_nothing_written(tmp_path, capsys):
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "src" / "broken.txt").write_text("broken")
    argv = [str(tmp_path / "src"), "--data-dir", str(tmp_path / "tfds"), "--name", "bad"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot read image") and "broken.png" in error
    assert not (tmp_path / "tfds" / "bad").exists()


def test_truncated_image_is_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(_pixels(0, (32, 32, 3))).save(buffer, format="PNG")
    (src / "cut.png").write_bytes(buffer.getvalue()[:-40])
    (src / "cut.txt").write_text("cut")
    with pytest.raises(DataError, match="cut.png"):
        build_image_folder_dataset(src, tmp_path / "tfds", name="cut")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_examples(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in"):
        find_examples(tmp_path / "empty")
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "img2.txt").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) .* no caption: img2.png"):
        find_examples(tmp_path / "src")
    with pytest.raises(DataError, match="dataset name 'Bad-Name' is not allowed"):
        build_image_folder_dataset(tmp_path / "src", tmp_path / "tfds", name="Bad-Name")


def test_metadata_errors(tmp_path):
    write_folder(tmp_path / "src", captions="metadata")
    metadata = tmp_path / "src" / "metadata.jsonl"
    rows = metadata.read_text().splitlines()
    metadata.write_text("\n".join(rows[:-1]))  # sub/img5.png no longer listed
    with pytest.raises(DataError, match=r"no caption for 1 image\(s\).*sub/img5.png"):
        find_examples(tmp_path / "src")
    metadata.write_text("\n".join([*rows, json.dumps({"file_name": "gone.png", "text": "x"})]))
    with pytest.raises(DataError, match="lists images that are not in .*gone.png"):
        find_examples(tmp_path / "src")
    metadata.write_text("\n".join([*rows, json.dumps({"name": "img0.png"})]))
    with pytest.raises(DataError, match="line 7 .* expected an object with 'file_name'"):
        find_examples(tmp_path / "src")
    metadata.write_text("\n".join([*rows, "{not json"]))
    with pytest.raises(DataError, match="line 7 is not JSON"):
        find_examples(tmp_path / "src")
    # "caption" is accepted for "text"; the examples come sorted by file name.
    metadata.write_text(
        "\n".join(
            json.dumps({"file_name": r["file_name"], "caption": "c"}) for r in map(json.loads, rows)
        )
    )
    examples = find_examples(tmp_path / "src")
    assert [e.file_name for e in examples] == sorted(e.file_name for e in examples)
    assert {e.caption for e in examples} == {"c"}
