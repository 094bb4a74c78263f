"""The adherence evaluator: exact on ground truth, robust to blur/noise, chance when wrong."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from support.tiny_specs import SD1_LIKE, random_params

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.cli import adherence as adherence_cli
from ldm_jax.data.shapes import (
    Placement,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesSource,
    generate_scene,
    render,
)
from ldm_jax.eval import adherence
from ldm_jax.eval.adherence import (
    METRICS,
    DetectedObject,
    check_scene_against,
    read_objects,
    score,
    shape_features,
    summarize,
)
from ldm_jax.spec import DiffusionSpec
from ldm_jax.tokenizers import CLIPTokenizer
from ldm_jax.training.config_overrides import load_config

N = 200
CHECKED = ("color", "shape", "position", "relation", "size", "count")


def _split(size: int, n: int = N):
    config = ShapesConfig(image_size=size)
    pairs = [generate_scene(config, "test", i) for i in range(n)]
    images = np.stack([render(scene, places, size) for scene, places in pairs])
    return images, [scene for scene, _ in pairs], [places for _, places in pairs]


@pytest.fixture(scope="module")
def split32():
    return _split(32)


def _blur(images, sigma):
    return ndimage.gaussian_filter(images.astype(np.float64) / 255, (0, sigma, sigma, 0))


def _hue_shift(images, degrees):
    """Rotate every colour about the grey axis (a hue shift that keeps white white)."""
    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    return np.clip(images / 255.0 @ rotation.T, 0.0, 1.0)


def _desaturate(images, factor):
    x = images / 255.0
    grey = x.mean(-1, keepdims=True)
    return grey + factor * (x - grey)


def _noise(images, std, seed=0):
    noisy = images + np.random.default_rng(seed).normal(0.0, std, images.shape)
    return np.clip(noisy, 0.0, 1.0)


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_scores_at_least_99_percent(size, split32):
    images, scenes, _ = split32 if size == 32 else _split(size, 100)
    report = score(images, scenes)
    for metric in METRICS:
        assert report.accuracy[metric] >= 0.99, (metric, report.summary())
    assert report.counts["color"] == sum(len(s.objects) for s in scenes)
    assert report.counts["position"] == sum(s.relation is not None for s in scenes)
    assert report.counts["position"] + report.counts["size"] == len(scenes)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda x: _blur(x, 1.0),
        lambda x: _blur(x, 1.5),
        lambda x: _noise(x / 255.0, 0.1),
        lambda x: _noise(_blur(x, 1.0), 0.08),
        lambda x: _hue_shift(x, 15),
        lambda x: _hue_shift(x, -15),
        lambda x: _desaturate(x, 0.5),
        lambda x: 0.1 + 0.8 * x / 255.0,  # grey background, duller colours
    ],
    ids=["blur1", "blur1.5", "noise0.1", "blur1+noise0.08", "hue+15", "hue-15", "sat0.5", "grey"],
)
def test_blurred_noisy_and_recoloured_ground_truth_is_still_read(corrupt, split32):
    images, scenes, _ = split32
    report = score(corrupt(images), scenes)
    for metric in CHECKED:
        assert report.accuracy[metric] >= 0.97, (metric, report.summary())


def _true_detections(scene, placements):
    """What a perfect reader would see: the generator's own attributes and layout."""
    return [
        DetectedObject(
            color=o.color,
            shape=o.shape,
            size="large" if p.extent >= adherence.LARGE_EXTENT else "small",
            cy=p.cy,
            cx=p.cx,
            area=p.extent**2,
            skew=0.0,
            squareness=1.0,
        )
        for o, p in zip(scene.objects, placements, strict=True)
    ]


def test_shuffled_captions_score_at_chance(split32):
    images, scenes, placements = split32
    perm = np.random.default_rng(0).permutation(N)
    shuffled = [scenes[p] for p in perm]
    report = score(images, shuffled)
    measured = report.accuracy
    # chance: a perfect reader's score on the same pairs, and on many more pairs
    same_pairs = summarize(
        [
            check_scene_against(_true_detections(s, p), c)
            for s, p, c in zip(scenes, placements, shuffled, strict=True)
        ]
    ).accuracy
    config = ShapesConfig()
    many = [generate_scene(config, "train", i) for i in range(4000)]
    order = np.random.default_rng(1).permutation(len(many))
    population = summarize(
        [check_scene_against(_true_detections(*many[i]), many[j][0]) for i, j in enumerate(order)]
    ).accuracy
    for metric in METRICS:
        assert abs(measured[metric] - same_pairs[metric]) <= 0.03, metric
        if metric != "relation":  # scored on the ~12 pairs with both colours: too few for a band
            # a 3-sigma binomial band around the population's chance rate for this many items
            rate, items = population[metric], report.counts[metric]
            band = max(0.03, 3 * np.sqrt(rate * (1 - rate) / items))
            assert abs(measured[metric] - rate) <= band, (metric, measured[metric], rate, band)
    # chance is far below the ground truth's >= 99%
    assert population["color"] < 0.5 and population["shape"] < 0.2
    assert population["position"] < 0.1 and population["size"] < 0.35
    assert population["all"] < 0.05 and 0.15 < population["relation"] < 0.35  # 1/4


def test_reads_a_known_scene():
    scene = Scene((ShapeObject("square", "red"), ShapeObject("triangle", "blue")), "left of")
    places = (Placement(0.25, 0.45, 0.33), Placement(0.75, 0.55, 0.33))
    found = read_objects(render(scene, places, 48))
    assert {o.color: o.shape for o in found} == {"red": "square", "blue": "triangle"}
    by_color = {o.color: o for o in found}
    # the chroma-weighted centroid of the triangle sits 1/9 of its width below the box centre
    assert abs(by_color["red"].cx - 0.25) < 0.02 and abs(by_color["red"].cy - 0.45) < 0.02
    assert abs(by_color["blue"].cy - (0.55 + 0.33 / 9)) < 0.02
    assert adherence.relation_between(by_color["red"], by_color["blue"]) == "left of"
    assert adherence.relation_between(by_color["blue"], by_color["red"]) == "right of"
    swapped = score([render(scene, places, 48)], [Scene(scene.objects, "right of")])
    assert swapped.accuracy["position"] == 0.0 and swapped.accuracy["relation"] == 0.0
    assert swapped.accuracy["color"] == 1.0 and swapped.accuracy["shape"] == 1.0
    # a caption colour that is not in the image: position fails, relation is not scored
    missing = score([render(scene, places, 48)], ["a red square left of a green triangle"])
    assert missing.accuracy["color"] == 0.5 and missing.accuracy["position"] == 0.0
    assert missing.counts["relation"] == 0 and missing.accuracy["count"] == 1.0


def test_shape_features_survive_blur():
    names = ("circle", "square", "triangle")
    shapes = {s: Scene((ShapeObject(s, "green", "large"),)) for s in names}
    place = (Placement(0.5, 0.5, 0.55),)
    for name, scene in shapes.items():
        image = render(scene, place, 64).astype(np.float64) / 255
        sharp = shape_features(image.max(-1) - image.min(-1))
        blurred = ndimage.gaussian_filter(image, (2.0, 2.0, 0))
        soft = shape_features(blurred.max(-1) - blurred.min(-1))
        np.testing.assert_allclose(soft, sharp, atol=0.08, err_msg=name)
        expected_skew, expected_square = {
            "circle": (0, 1),
            "square": (0, 2),
            "triangle": (0.84, 1),
        }[name]
        np.testing.assert_allclose(sharp, (expected_skew, expected_square), atol=0.06)


def test_empty_and_wrong_images_fail():
    scene = Scene((ShapeObject("circle", "yellow", "small"),))
    white = np.full((32, 32, 3), 255, np.uint8)
    report = score([white], [scene])
    assert report.accuracy["color"] == 0.0 and report.accuracy["count"] == 0.0
    assert np.isnan(report.accuracy["position"]) and report.counts["position"] == 0
    red_square = Scene((ShapeObject("square", "red", "large"),))
    big_red = render(red_square, (Placement(0.5, 0.5, 0.55),), 32)
    checks = score([big_red], ["a small red circle"]).per_image[0]
    assert checks == {
        "color": [True], "shape": [False], "position": [], "relation": [], "size": [False],
        "count": [True], "all": [False],
    }  # fmt: skip


def test_captions_scenes_and_records_give_the_same_score(split32):
    images, scenes, _ = split32
    by_scene = score(images[:20], scenes[:20]).accuracy
    assert score(images[:20], [s.caption for s in scenes[:20]]).accuracy == by_scene
    assert score(images[:20], [s.to_record() for s in scenes[:20]]).accuracy == by_scene
    floats = score(images[:20].astype(np.float32) / 255, scenes[:20]).accuracy
    assert floats == by_scene


@pytest.mark.parametrize(
    "images, scenes, message",
    [
        (np.zeros((1, 8, 8)), ["a small red circle"], "must be \\[H, W, 3\\]"),
        (np.zeros((1, 8, 8, 3), np.int32), ["a small red circle"], "dtype"),
        (np.zeros((2, 8, 8, 3), np.uint8), ["a small red circle"], "2 images but 1"),
        (np.zeros((0, 8, 8, 3), np.uint8), [], "nothing to score"),
        (np.zeros((1, 8, 8, 3), np.uint8), ["a cat"], "cannot read caption"),
    ],
)
def test_bad_input_is_one_clear_error(images, scenes, message):
    with pytest.raises(ValueError, match=message):
        score(images, scenes)


# --- the CLI
@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--checkpoint is required when there is no default model (runs/default/model)"),
        (["--checkpoint", "nowhere"], "not found"),
        (["--checkpoint", ".", "--n", "0"], "--n must be in"),
        (["--checkpoint", ".", "--n", "5000"], "--n must be in"),
        (["--checkpoint", ".", "--steps", "0"], "--steps"),
    ],
)
def test_cli_bad_input_exits_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no default run's model here
    assert adherence_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_cli_help_gives_the_defaults_and_why(capsys):
    # the guidance the default run samples its grid with (and train.py's closing hint prints)
    default_run = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "default.py"))
    assert adherence_cli.DEFAULT_GUIDANCE == default_run.sample.guidance == 4.0
    with pytest.raises(SystemExit) as done:
        adherence_cli.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "default: the default run's model, as sample.py's" in text
    assert "default 4: the default run samples its grid and README's figures with it" in text


def test_cli_samples_the_default_runs_model_and_reports(tmp_path, capsys, monkeypatch):
    """No --checkpoint: the default run's model (here a tiny random ldm_jax orbax checkpoint,
    VAE factor 2, 16x16 images, where `python train.py` writes it)."""
    spec = dataclasses.replace(SD1_LIKE, diffusion=DiffusionSpec(latent_size=8))
    checkpoint = LatentDiffusionCheckpoint(
        spec, random_params(spec), CLIPTokenizer.from_packaged_vocab()
    )
    monkeypatch.chdir(tmp_path)
    checkpoint.save_pretrained(tmp_path / "runs" / "default" / "model", format="orbax")
    out_json, grid = tmp_path / "report.json", tmp_path / "grid.png"
    argv = ["--n", "3", "--batch", "2", "--steps", "2"]
    argv += ["--json", str(out_json), "--grid", str(grid), "--no-progress"]
    assert adherence_cli.main(argv) == 0
    table = capsys.readouterr().out
    for metric in METRICS:
        assert metric in table
    report = json.loads(out_json.read_text())
    assert report["checkpoint"] == str(Path("runs", "default", "model"))
    assert report["settings"]["guidance"] == 4.0 == adherence_cli.DEFAULT_GUIDANCE
    assert report["counts"]["count"] == 3 and len(report["images"]) == 3
    assert [i["prompt"] for i in report["images"]] == ShapesSource(split="test").captions(3)
    for value in report["accuracy"].values():
        assert value is None or 0.0 <= value <= 1.0
    from PIL import Image  # noqa: PLC0415

    assert Image.open(grid).size == (32, 32)  # 3 images of 16x16 in a 2x2 grid
    assert adherence_cli.main(argv) == 2  # outputs exist: kept unless --overwrite
