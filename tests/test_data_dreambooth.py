"""DreamBooth's input with prior preservation: instance and class halves side by side (keys,
shapes, prompts), exact resume of both, the host split, class-image generation that tops a folder
up without overwriting, and one clear error per bad config or folder."""

import json

import numpy as np
import pytest
from PIL import Image
from test_data_loader import assert_same_batches

from ldm_jax.data import DataError, default_data_config
from ldm_jax.data.dreambooth import (
    check_dreambooth_config,
    class_seed,
    dreambooth_batches,
    ensure_class_images,
    image_records,
    list_images,
)
from ldm_jax.tokenizers.clip import CLIPTokenizer

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
# every image's red channel is one value naming it: instance i -> 20 + 20 i, class j -> 110 + 20 j
INSTANCE_REDS = (20, 40, 60)
CLASS_REDS = (110, 130, 150, 170, 190)
INSTANCE_HW, CLASS_HW = (24, 32), (28, 20)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_packaged_vocab(max_length=8)


def pixels(red: int, hw, seed: int) -> np.ndarray:
    """uint8 [h, w, 3]: red channel constant (the image's name), green/blue noise."""
    image = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    image[..., 0] = red
    return image


def write_images(folder, reds, hw, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, red in enumerate(reds):
        name = names[i] if names else f"img{i}.png"
        written[name] = pixels(red, hw, seed=red)
        Image.fromarray(written[name]).save(folder / name)
    return written


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    write_images(root / "instance", INSTANCE_REDS, INSTANCE_HW)
    write_images(root / "class", CLASS_REDS, CLASS_HW)
    return root


def db_config(folders, **overrides):
    settings = dict(
        source="dreambooth", instance_dir=str(folders / "instance"),
        instance_prompt=INSTANCE_PROMPT, class_dir=str(folders / "class"),
        class_prompt=CLASS_PROMPT, num_class_images=5, image_size=16, num_threads=0,
    )  # fmt: skip
    return default_data_config(**{**settings, **overrides})


def make(config, tokenize_fn, batch_size=4, seed=0, **kwargs):
    kwargs.setdefault("data_parallel_size", 1)
    return dreambooth_batches(config, tokenize_fn, batch_size, seed, **kwargs)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def reds_of(images_BHW3) -> list[int]:
    """The red value naming each row's image (constant over the crop, to rounding)."""
    reds = np.round((images_BHW3[..., 0] + 1.0) * 127.5)
    assert np.all(np.abs(reds - reds[:, :1, :1]) <= 2)
    return [int(r) for r in reds[:, 0, 0]]


def named(reds, names) -> list[int]:
    """Which of `names` (red values) each row is; fails on a row of neither half."""
    out = []
    for red in reds:
        match = [n for n in names if abs(n - red) <= 2]
        assert len(match) == 1, (red, names)
        out.append(match[0])
    return out


def test_image_records_read_the_folders_images_in_name_order(tmp_path):
    folder = tmp_path / "photos"
    written = write_images(folder, (5, 6, 7), (6, 9), names=["b.png", "a.PNG", "c.bmp"])
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(pixels(1, (6, 9), 1)).save(folder / ".hidden.png")
    write_images(folder / "sub", (8,), (6, 9))  # subfolders are not read
    records = image_records(folder, "a photo of sks cat")
    assert [r["caption"] for r in records] == ["a photo of sks cat"] * 3
    for record, name in zip(records, ["a.PNG", "b.png", "c.bmp"], strict=True):
        assert record["image"].dtype == np.uint8 and record["image"].shape == (6, 9, 3)
        np.testing.assert_array_equal(record["image"], written[name])
    assert [p.name for p in list_images(folder)] == ["a.PNG", "b.png", "c.bmp"]
    assert len(image_records(folder, "x", limit=2)) == 2


def test_batches_hold_the_instance_and_class_halves(folders, tokenizer):
    iterator = make(db_config(folders), tokenizer)
    batches = take(iterator, 3)
    iterator.close()
    instance_tokens = tokenizer([INSTANCE_PROMPT] * 4)
    class_tokens = tokenizer([CLASS_PROMPT] * 4)
    assert not np.array_equal(instance_tokens, class_tokens)
    seen_instance, seen_class = [], []
    for batch in batches:
        assert set(batch) == {"image", "tokens", "prior_image", "prior_tokens"}
        for key in ("image", "prior_image"):
            assert batch[key].shape == (4, 16, 16, 3) and batch[key].dtype == np.float32
            assert batch[key].min() >= -1.0 and batch[key].max() <= 1.0
        np.testing.assert_array_equal(batch["tokens"], instance_tokens)
        np.testing.assert_array_equal(batch["prior_tokens"], class_tokens)
        assert batch["prior_tokens"].dtype == np.int32
        seen_instance += named(reds_of(batch["image"]), INSTANCE_REDS)
        seen_class += named(reds_of(batch["prior_image"]), CLASS_REDS)
    # 12 rows a half: every image of each folder, each epoch once (3 and 5 images)
    assert sorted(set(seen_instance)) == list(INSTANCE_REDS)
    assert sorted(seen_instance[:3]) == list(INSTANCE_REDS)
    assert sorted(set(seen_class)) == list(CLASS_REDS)
    assert sorted(seen_class[:5]) == list(CLASS_REDS)


def test_without_prior_preservation_only_the_instance_half(folders, tokenizer):
    iterator = make(db_config(folders, class_dir="", class_prompt=""), tokenizer, batch_size=2)
    batch = next(iterator)
    assert set(batch) == {"image", "tokens"}
    assert batch["image"].shape == (2, 16, 16, 3)
    named(reds_of(batch["image"]), INSTANCE_REDS)
    assert iterator.get_state()["dreambooth"]["prior"] is None
    iterator.close()


def test_sdxl_tokens_and_micro_conditioning_in_both_halves(folders, tokenizer):
    def two_encoders(captions):
        return tokenizer(captions), tokenizer(captions)[:, ::-1]

    with make(db_config(folders), two_encoders, micro_conditioning=True) as iterator:
        batch = next(iterator)
    names = ("image", "tokens", "original_size", "crop_top_left")
    assert set(batch) == {*names, *(f"prior_{n}" for n in names)}
    assert batch["tokens"].shape == batch["prior_tokens"].shape == (4, 2, 8)
    np.testing.assert_array_equal(
        batch["prior_tokens"][:, 1], tokenizer([CLASS_PROMPT] * 4)[:, ::-1]
    )
    assert batch["original_size"].tolist() == [list(INSTANCE_HW)] * 4
    assert batch["prior_original_size"].tolist() == [list(CLASS_HW)] * 4
    assert batch["crop_top_left"].shape == batch["prior_crop_top_left"].shape == (4, 2)


def test_state_round_trip_resumes_both_halves_exactly(folders, tokenizer):
    config = db_config(folders, num_threads=2, min_scale=1.0, max_scale=1.5)
    iterator = make(config, tokenizer, seed=7)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # checkpoints store it as JSON
    after = take(iterator, 3)
    resumed = make(config, tokenizer, seed=7)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), after)
    fresh = make(config, tokenizer, seed=7)  # not the start again
    first = next(fresh)
    assert not np.array_equal(first["image"], after[0]["image"])
    assert not np.array_equal(first["prior_image"], after[0]["prior_image"])
    for it in (iterator, resumed, fresh):
        it.close()


def test_halves_have_independent_seeds(tmp_path, folders, tokenizer):
    assert class_seed(7) != 7 and class_seed(7) == class_seed(7) and class_seed(8) != class_seed(7)
    write_images(tmp_path / "same", CLASS_REDS, CLASS_HW)  # the class images as instances
    config = db_config(folders, instance_dir=str(tmp_path / "same"))
    with make(config, tokenizer, seed=3) as iterator:
        batch = next(iterator)
    # the same 5 images in both folders: different shuffles and crops per half
    assert not np.array_equal(batch["image"], batch["prior_image"])


def test_shuffle_seed_overrides_the_run_seed_in_both_halves(folders, tokenizer):
    config = db_config(folders, shuffle_seed=11)
    batches = [next(make(config, tokenizer, seed=s)) for s in (0, 1)]
    assert_same_batches(*[[b] for b in batches])


def test_two_processes_split_each_global_batch(folders, tokenizer):
    config = db_config(folders)
    single = take(make(config, tokenizer), 3)
    hosts = [take(make(config, tokenizer, process_index=p, process_count=2), 3) for p in range(2)]
    for step in range(3):
        halves = [hosts[p][step] for p in range(2)]
        assert all(h["image"].shape[0] == h["prior_image"].shape[0] == 2 for h in halves)
        for key in single[step]:
            np.testing.assert_array_equal(
                np.concatenate([h[key] for h in halves]), single[step][key]
            )
    # first global batch of the class half: 4 distinct images of its first epoch, 2 per host
    first = [set(named(reds_of(hosts[p][0]["prior_image"]), CLASS_REDS)) for p in range(2)]
    assert len(first[0]) == len(first[1]) == 2 and not first[0] & first[1]
    with pytest.raises(DataError, match="4 is not divisible by the 3 processes"):
        make(config, tokenizer, process_index=0, process_count=3)


def test_state_of_another_pipeline_is_refused(folders, tokenizer):
    with_prior = make(db_config(folders), tokenizer)
    without = make(db_config(folders, class_dir=""), tokenizer)
    with pytest.raises(DataError, match="from a run with prior preservation, this run is without"):
        without.set_state(with_prior.get_state())
    with pytest.raises(DataError, match="from a run without prior preservation, this run is with"):
        with_prior.set_state(without.get_state())
    with pytest.raises(DataError, match="not a DreamBooth one"):
        with_prior.set_state(with_prior.instance.get_state())  # a plain loader's state
    other_batch = make(db_config(folders), tokenizer, batch_size=2)
    with pytest.raises(DataError, match="global_batch_size: saved 4, now 2"):
        other_batch.set_state(with_prior.get_state())
    for it in (with_prior, without, other_batch):
        it.close()


class Generator:
    """A fake class-image generator recording its calls: image k has red value 200 + k."""

    def __init__(self, hw=(12, 10)):
        self.hw, self.calls = hw, []

    def __call__(self, prompts, first_index):
        self.calls.append((list(prompts), first_index))
        return np.stack([pixels(200 + first_index + i, self.hw, i) for i in range(len(prompts))])


def test_ensure_class_images_generates_only_the_missing_ones(tmp_path, folders, tokenizer):
    class_dir = tmp_path / "class"
    write_images(class_dir, (1, 2), (8, 8), names=["class_00002.png", "a.jpg"])
    user_bytes = (class_dir / "class_00002.png").read_bytes()
    generate = Generator()
    assert ensure_class_images(class_dir, 6, CLASS_PROMPT, generate, batch_size=3) == 4
    assert generate.calls == [([CLASS_PROMPT] * 3, 2), ([CLASS_PROMPT], 5)]
    names = sorted(p.name for p in class_dir.iterdir())  # nothing hidden is left behind
    assert names == ["a.jpg", *(f"class_{i:05d}.png" for i in (2, 3, 4, 5, 6))]
    assert (class_dir / "class_00002.png").read_bytes() == user_bytes  # never overwritten
    for k, index in enumerate((3, 4, 5, 6)):  # generated images 2..5, under the free names
        with Image.open(class_dir / f"class_{index:05d}.png") as image:
            np.testing.assert_array_equal(np.asarray(image), pixels(202 + k, (12, 10), k % 3))
    # enough now: nothing generated, the prompt not even needed
    assert ensure_class_images(class_dir, 6, "", generate) == 0
    assert ensure_class_images(class_dir, 3, CLASS_PROMPT, generate) == 0
    assert len(generate.calls) == 2
    # a missing folder is created; 0 images asked: nothing to do
    assert ensure_class_images(tmp_path / "new" / "dir", 2, CLASS_PROMPT, Generator()) == 2
    assert len(list_images(tmp_path / "new" / "dir")) == 2
    assert ensure_class_images(tmp_path / "none", 0, "", Generator()) == 0
    # the topped-up folder feeds the class half
    config = db_config(folders, class_dir=str(class_dir), num_class_images=6)
    with make(config, tokenizer, batch_size=6) as iterator:
        assert next(iterator)["prior_image"].shape == (6, 16, 16, 3)


def test_ensure_class_images_errors(tmp_path):
    with pytest.raises(DataError, match="num_class_images must be an integer >= 0, got -1"):
        ensure_class_images(tmp_path / "c", -1, CLASS_PROMPT, Generator())
    with pytest.raises(DataError, match="has 0 of num_class_images=2 .* class_prompt is ' '"):
        ensure_class_images(tmp_path / "c", 2, " ", Generator())
    with pytest.raises(DataError, match="class_dir is empty"):
        ensure_class_images("", 2, CLASS_PROMPT, Generator())
    with pytest.raises(DataError, match="batch size must be an integer >= 1, got 0"):
        ensure_class_images(tmp_path / "c", 2, CLASS_PROMPT, Generator(), batch_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a folder"):
        ensure_class_images(tmp_path / "file", 2, CLASS_PROMPT, Generator())

    def float_images(prompts, first_index):
        return np.zeros((len(prompts), 8, 8, 3), np.float32)

    with pytest.raises(DataError, match=r"returned float32 \(2, 8, 8, 3\) for 2 prompts"):
        ensure_class_images(tmp_path / "c", 2, CLASS_PROMPT, float_images)
    assert list_images(tmp_path / "c") == []  # nothing half-written


def test_folder_errors(tmp_path, folders, tokenizer):
    with pytest.raises(DataError, match="missing does not exist"):
        image_records(tmp_path / "missing", "x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "caption.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images in .*empty; .*ending in \.png, \.jpg"):
        image_records(tmp_path / "empty", "x")
    write_images(tmp_path / "bad", (1,), (4, 4))
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        image_records(tmp_path / "bad", "x")
    with pytest.raises(DataError, match=r"no images in .*empty"):
        make(db_config(folders, instance_dir=str(tmp_path / "empty")), tokenizer)
    with pytest.raises(DataError, match=r"has 5 class image\(s\), fewer than .*=6; generate"):
        make(db_config(folders, num_class_images=6), tokenizer)
    with pytest.raises(DataError, match=r"nowhere has 0 class image\(s\), fewer than .*=5"):
        make(db_config(folders, class_dir=str(tmp_path / "nowhere")), tokenizer)
    with make(db_config(folders, num_class_images=0), tokenizer) as iterator:  # 0 = all there
        assert iterator.prior.fingerprint["num_examples"] == 5
    with make(db_config(folders, num_class_images=2), tokenizer) as iterator:  # the first 2
        assert iterator.prior.fingerprint["num_examples"] == 2
    with pytest.raises(DataError, match="needs a text-conditioned model"):
        make(db_config(folders), None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"instance_dir": ""}, "data.instance_dir is empty"),
        ({"instance_prompt": "  "}, "data.instance_prompt is empty"),
        ({"instance_prompt": None}, "data.instance_prompt must be a string"),
        ({"class_prompt": ""}, "data.class_prompt is empty but data.class_dir="),
        ({"num_class_images": -1}, "num_class_images must be an integer >= 0 .*got -1"),
        ({"num_class_images": 2.5}, "num_class_images must be an integer >= 0 .*got 2.5"),
        ({"prior_loss_weight": -0.5}, "prior_loss_weight must be a finite number >= 0"),
        ({"prior_loss_weight": float("nan")}, "prior_loss_weight must be a finite number"),
        ({"label_key": "label"}, "leave data.label_key empty"),
        ({"buckets": [(16, 16)]}, "buckets .* are not supported with data.source='dreambooth'"),
        ({"bucket_area": 256, "bucket_step": 8}, "buckets .* are not supported"),
        ({"image_size": 0}, "image_size must be a positive integer"),
    ],
)
def test_config_errors(folders, tokenizer, overrides, message):
    config = default_data_config(**{**db_config(folders).to_dict(), **overrides})
    with pytest.raises(DataError, match=message):
        make(config, tokenizer)


def test_valid_configs_pass_the_check(folders):
    check_dreambooth_config(db_config(folders))
    check_dreambooth_config(db_config(folders, class_dir="", class_prompt="", prior_loss_weight=0))
    check_dreambooth_config(  # plain dicts work too; absent keys take the defaults
        {"instance_dir": "x", "instance_prompt": "a sks dog"}
    )
    defaults = default_data_config()
    db_defaults = (defaults.class_dir, defaults.num_class_images, defaults.prior_loss_weight)
    assert db_defaults == ("", 100, 1.0)


def test_the_trainer_stacks_the_halves_with_the_loaders_prefix():
    from ldm_jax.data.dreambooth import PRIOR_PREFIX as loader_prefix  # noqa: PLC0415
    from ldm_jax.training.dreambooth_setup import PRIOR_PREFIX  # noqa: PLC0415

    assert PRIOR_PREFIX == loader_prefix
