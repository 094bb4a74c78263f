"""The grain input pipeline: TFDS and in-memory sources -> per-host batches, exact resume from the
iterator state, host sharding, global batch assembly on 8 fake devices, clear errors."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from ldm_jax.data import (
    DataError,
    default_data_config,
    make_train_dataset,
    register_source,
    to_global_batch,
)
from ldm_jax.data.image_folder import build_image_folder_dataset
from ldm_jax.tokenizers.clip import CLIPTokenizer

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
}


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_packaged_vocab(max_length=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared TFDS dataset "colours": 6 single-colour images of different sizes, captioned
    with their colour."""
    root = tmp_path_factory.mktemp("data")
    src = root / "src"
    src.mkdir()
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (10 + i, 12), rgb).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"a {name} square")
    build_image_folder_dataset(src, root / "tfds", name="colours")
    return root / "tfds"


def colours_config(data_dir, **overrides):
    defaults = dict(
        source="tfds", name="colours", data_dir=str(data_dir), image_size=8, num_threads=0
    )
    return default_data_config(**{**defaults, **overrides})


def labelled_records(n: int):
    """In-memory records whose image encodes the label (every pixel = label)."""
    return [
        {"image": np.full((9, 11, 3), i, np.uint8), "caption": f"{i}", "label": i} for i in range(n)
    ]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_tfds_batches_pair_each_image_with_its_caption(data_dir, tokenizer):
    iterator = make_train_dataset(colours_config(data_dir), tokenizer, 4, seed=0)
    expected = {name: tokenizer([f"a {name} square"])[0] for name in COLOURS}
    seen = set()
    for batch in take(iterator, 3):
        assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
        assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
        for image, tokens in zip(batch["image"], batch["tokens"], strict=True):
            rgb = tuple(np.round((image[0, 0] + 1) * 127.5).astype(int))
            name = next(n for n, c in COLOURS.items() if c == rgb)
            assert np.all(image == image[0, 0])  # one colour, whole crop
            np.testing.assert_array_equal(tokens, expected[name])
            seen.add(name)
    assert seen == set(COLOURS)  # 12 rows over two epochs of 6


def test_state_round_trip_resumes_exactly(data_dir, tokenizer):
    config = colours_config(data_dir, num_threads=2, min_scale=1.0, max_scale=1.5)
    iterator = make_train_dataset(config, tokenizer, 4, seed=7)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # checkpoints store it as JSON
    after = take(iterator, 2)
    resumed = make_train_dataset(config, tokenizer, 4, seed=7)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 2), after)
    fresh = make_train_dataset(config, tokenizer, 4, seed=7)  # and different from the start
    assert not np.array_equal(take(fresh, 1)[0]["image"], after[0]["image"])
    for it in (iterator, resumed, fresh):
        it.close()


def test_prefetch_threads_do_not_change_the_batches(data_dir, tokenizer):
    batches = [
        take(make_train_dataset(colours_config(data_dir, num_threads=n), tokenizer, 2, 3), 5)
        for n in (0, 3)
    ]
    assert_same_batches(*batches)


def test_two_processes_read_disjoint_halves_of_the_same_global_batches():
    config = default_data_config(image_size=4, label_key="label", num_threads=0)
    records = labelled_records(16)
    single = take(make_train_dataset(config, None, 8, 0, source=records), 4)
    hosts = [
        take(
            make_train_dataset(
                config, None, 8, 0, source=records, process_index=p, process_count=2
            ),
            4,
        )
        for p in range(2)
    ]
    for step in range(4):
        halves = [hosts[p][step] for p in range(2)]
        assert all(h["class_label"].shape == (4,) for h in halves)
        assert not set(halves[0]["class_label"]) & set(halves[1]["class_label"])
        for key in ("image", "class_label"):
            np.testing.assert_array_equal(
                np.concatenate([h[key] for h in halves]), single[step][key]
            )
    epoch = np.concatenate([hosts[p][s]["class_label"] for p in range(2) for s in range(2)])
    assert sorted(epoch) == list(range(16))  # one epoch: every example once, on one host


def test_epochs_are_reshuffled_and_shuffle_can_be_off():
    records = labelled_records(8)
    config = default_data_config(image_size=4, label_key="label", num_threads=0)
    epochs = [
        b["class_label"] for b in take(make_train_dataset(config, None, 8, 1, source=records), 3)
    ]
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    assert epochs[0].dtype == np.int32
    config.shuffle = False
    ordered = take(make_train_dataset(config, None, 8, 1, source=records), 2)
    assert all(b["class_label"].tolist() == list(range(8)) for b in ordered)


def test_registered_in_memory_source():
    register_source("test_digits", lambda data_cfg, split: labelled_records(4))
    config = default_data_config(source="test_digits", image_size=4, label_key="label")
    batch = next(make_train_dataset(config, None, 4, 0))
    assert sorted(batch["class_label"]) == [0, 1, 2, 3]


def test_to_global_batch_on_8_devices():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    config = default_data_config(image_size=4, label_key="label", num_threads=0)
    local = next(
        make_train_dataset(config, None, 8, 0, source=labelled_records(8), data_parallel_size=8)
    )
    batch = to_global_batch(local, sharding)
    assert batch["image"].shape == (8, 4, 4, 3) and batch["class_label"].shape == (8,)
    for key, array in batch.items():
        assert array.sharding == sharding
        assert len(array.addressable_shards) == 8
        for shard in array.addressable_shards:
            assert shard.data.shape[0] == 1  # one row per device
            np.testing.assert_array_equal(shard.data, local[key][shard.index])
    with pytest.raises(DataError, match=r"global shape \(6, 4\) does not split"):
        to_global_batch({"tokens": np.zeros((6, 4), np.int32)}, sharding)


def test_folder_source_builds_once_then_reads(tmp_path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(src / "red.png")
    (src / "red.txt").write_text("red")
    config = default_data_config(
        source="folder", folder=str(src), data_dir=str(tmp_path / "d"), image_size=8, num_threads=0
    )
    with pytest.raises(DataError, match="multi-host runs read a prepared dataset"):
        make_train_dataset(config, tokenizer, 2, 0, process_index=0, process_count=2)
    batch = next(make_train_dataset(config, tokenizer, 2, 0))
    np.testing.assert_array_equal(batch["tokens"], tokenizer(["red", "red"]))
    assert (tmp_path / "d" / "image_folder" / "1.0.0" / "dataset_info.json").is_file()
    (src / "red.png").unlink()  # prepared: the folder is not read again
    assert next(make_train_dataset(config, tokenizer, 2, 0))["image"].shape == (2, 8, 8, 3)


def test_dataset_errors(tmp_path, data_dir, tokenizer):
    def make(config, **kwargs):
        return make_train_dataset(config, tokenizer, 2, 0, **kwargs)

    with pytest.raises(DataError, match="data_dir .*missing does not exist"):
        make(colours_config(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"'photos' is not prepared .*prepared there: colours:1\.0"):
        make(colours_config(data_dir, name="photos"))
    with pytest.raises(DataError, match=r"prepared there: none"):
        make(colours_config(tmp_path))
    with pytest.raises(DataError, match=r"split 'test'.*splits: \['train'\]"):
        make(colours_config(data_dir, split="test"))
    with pytest.raises(DataError, match="data.name is empty"):
        make(colours_config(data_dir, name=""))
    with pytest.raises(DataError, match=r"no data.caption_key='text'; their keys: \['caption'"):
        make(colours_config(data_dir, caption_key="text"))
    with pytest.raises(DataError, match=r"unknown data.source 'nope'; allowed: \('tfds', "):
        make(default_data_config(source="nope"))
    with pytest.raises(DataError, match="split 'train'\\) is empty"):
        make(default_data_config(), source=[])
    with pytest.raises(DataError, match="unknown data config keys \\['img_size'\\]"):
        default_data_config(img_size=3)


def test_batch_size_errors(data_dir, tokenizer):
    config = colours_config(data_dir)
    with pytest.raises(DataError, match="6 is not divisible by the 4 processes"):
        make_train_dataset(config, tokenizer, 6, 0, process_index=0, process_count=4)
    with pytest.raises(DataError, match="6 is not divisible by the 4 data-parallel devices"):
        make_train_dataset(config, tokenizer, 6, 0, data_parallel_size=4)
    with pytest.raises(DataError, match="positive integer, got 0"):
        make_train_dataset(config, tokenizer, 0, 0)
    with pytest.raises(DataError, match=r"data seed must be in \[0, 2\*\*32\)"):
        make_train_dataset(config, tokenizer, 2, 2**32)


def test_state_from_another_pipeline_is_refused(data_dir, tokenizer):
    state = make_train_dataset(colours_config(data_dir), tokenizer, 2, 0).get_state()
    other = make_train_dataset(colours_config(data_dir), tokenizer, 4, 0)
    with pytest.raises(DataError, match="global_batch_size: saved 2, now 4"):
        other.set_state(state)


def test_data_dir_from_home_or_tfds_data_dir(data_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("HOME", str(data_dir.parent))
    batch = next(make_train_dataset(colours_config(f"~/{data_dir.name}"), tokenizer, 2, 0))
    assert batch["image"].shape == (2, 8, 8, 3)
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))  # data_dir "" = TFDS's default
    assert next(make_train_dataset(colours_config(""), tokenizer, 2, 0))["tokens"].shape == (2, 8)
