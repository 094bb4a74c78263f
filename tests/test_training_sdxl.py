"""SDXL training: a tiny SDXL model (two text encoders, text_time UNet) trains on 8 fake CPU
devices with aspect-ratio buckets of two shapes (size/crop micro-conditioning from the data,
dropout of both encoders' prompts), and a run resumed from its step-1 checkpoint (data-iterator
state included) ends bit-exactly where the uninterrupted run did."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from support.tiny_specs import MICRO_SDXL

from ldm_jax.data import DataError, register_source
from ldm_jax.data.buckets import assign_buckets, check_buckets, generate_buckets
from ldm_jax.spec import spec_to_dict
from ldm_jax.training import loop, metrics, tasks
from ldm_jax.training.config_checks import ConfigError, check_config
from ldm_jax.training.config_overrides import load_config
from ldm_jax.training.ldm_step import drop_tokens

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = ((16, 16), (16, 24))  # latent 8x8 and 8x12; multiples of 4 = VAE 2 x 2 UNet levels


def bucket_records(data_cfg, split):
    """8 square and 8 landscape (2:3) images: one global batch of 8 per bucket and epoch."""
    rng = np.random.default_rng(0)
    shapes = [(20, 20)] * 8 + [(18, 27)] * 8
    return [
        {"image": rng.integers(0, 256, (*hw, 3), dtype=np.uint8), "caption": f"a shape {i}"}
        for i, hw in enumerate(shapes)
    ]


register_source("sdxl_test_buckets", bucket_records)


def sdxl_config():
    config = load_config(str(ROOT / "configs" / "ldm_tiny.py"))
    config.model.spec = spec_to_dict(MICRO_SDXL)
    config.diffusion.cond_drop_prob = 0.5
    config.data.update(dict(source="sdxl_test_buckets", buckets=BUCKETS, global_batch_size=8,
                            num_threads=0))
    config.train.update(dict(num_steps=2, log_every=1, checkpoint_every=1, sample_every=0,
                             async_checkpointing=False, progress_bar=False))
    config.sample.num_images = 0
    return config


def losses(workdir):
    return {s: r["loss"] for s, r in metrics.read_jsonl(Path(workdir) / "metrics.jsonl").items()}


@pytest.mark.slow  # ~60 s on 2 cores: the SDXL step compiled for two bucket shapes
def test_sdxl_trains_two_bucket_shapes_and_resumes_exactly(tmp_path):
    config = sdxl_config()
    task = tasks.make_task(config)  # one task: its jitted step is reused by the three runs
    batches = task.make_iterator()
    first = [next(batches) for _ in range(2)]
    batches.close()
    assert {b["image"].shape for b in first} == {(8, 16, 16, 3), (8, 16, 24, 3)}
    for batch in first:  # each image's own size; the crop lies inside its resize
        sizes = {tuple(s) for s in np.asarray(batch["original_size"])}
        assert sizes in ({(20, 20)}, {(18, 27)})
        assert batch["tokens"].shape == (8, 2, 8)  # both tokenizers, one array
    landscape = next(b for b in first if b["image"].shape[2] == 24)
    assert set(np.asarray(landscape["crop_top_left"])[:, 0]) == {0}  # 16 x 24 fills the height

    straight = loop.run(config, tmp_path / "straight", task)
    assert straight.step == 2
    loss = losses(tmp_path / "straight")
    assert sorted(loss) == [1, 2] and all(np.isfinite(v) for v in loss.values())

    # a run stopped after step 1 (its checkpoint and metrics), resumed in a fresh workdir
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "2")
    (resumed_dir / "metrics.jsonl").write_text(
        (resumed_dir / "metrics.jsonl").read_text().splitlines(keepends=True)[0]
    )
    resumed = loop.run(config, resumed_dir, task)
    assert resumed.step == 2
    assert losses(resumed_dir) == loss
    for part in ("params", "ema_params", "opt_state"):
        a, b = (jax.device_get(getattr(r.state, part)) for r in (straight, resumed))
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_dropout_replaces_the_prompt_of_every_encoder_together():
    tokens_BET = np.arange(64 * 2 * 3, dtype=np.int32).reshape(64, 2, 3) + 100
    null_ET = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    dropped = np.asarray(drop_tokens(tokens_BET, null_ET, 0.5, jax.random.key(0)))
    is_null_BE = (dropped == null_ET[None]).all(-1)
    kept_BE = (dropped == tokens_BET).all(-1)
    assert (is_null_BE | kept_BE).all()
    assert (is_null_BE[:, 0] == is_null_BE[:, 1]).all()  # never one encoder alone
    assert 0 < is_null_BE[:, 0].sum() < 64


def test_generated_buckets_hold_sdxls_shapes():
    buckets = generate_buckets(1024 * 1024, 64, 4.0)
    assert {(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344)} <= set(buckets)
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 for h, w in buckets)
    assert all(max(h, w) / min(h, w) <= 4.0 for h, w in buckets)


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ((), "data.buckets is empty"),
        (((16, 18),), r"not multiples of 4 \(the VAE"),
        (((16,),), "not a \\(height, width\\) pair"),
        (((16, 16), (16, 16)), "duplicates"),
    ],
)
def test_bad_buckets_are_clear_errors(buckets, message):
    with pytest.raises(DataError, match=message):
        check_buckets(buckets, 4)


def test_an_image_that_fits_no_bucket_is_named():
    sizes = np.array([[20, 20], [20, 100]])
    with pytest.raises(DataError, match=r"image 1 \(20x100.*fits no bucket.*70%"):
        assign_buckets(sizes, BUCKETS, max_crop=0.5)
    assert assign_buckets(np.array([[20, 20], [20, 31]]), BUCKETS, 0.5).tolist() == [0, 1]


def test_the_sdxl_config_passes_the_checks_and_bad_buckets_do_not():
    config = load_config(str(ROOT / "configs" / "sdxl_finetune.py"))
    check_config(config)
    assert config.data.bucket_area == 1024 * 1024 and config.compute_dtype == "bfloat16"
    config.data.bucket_area = 0
    config.data.buckets = ()
    with pytest.raises(ConfigError, match="data.buckets is empty"):
        check_config(config)


def test_sdxl_time_ids_need_the_base_conditioner():
    import dataclasses  # noqa: PLC0415

    from ldm_jax.spec import SDXL_REFINER_TIME_IDS  # noqa: PLC0415
    from ldm_jax.training.ldm_step import check_sdxl_training  # noqa: PLC0415

    refiner = dataclasses.replace(MICRO_SDXL.cond_stage.config, time_ids=SDXL_REFINER_TIME_IDS)
    with pytest.raises(ValueError, match="aesthetic score"):
        check_sdxl_training(refiner)


def test_bucketed_batches_are_the_same_on_any_host_count_and_after_set_state():
    from ldm_jax.data import default_data_config, make_train_dataset  # noqa: PLC0415
    from ldm_jax.tokenizers import SDXLTokenizers  # noqa: PLC0415

    data = default_data_config(source="sdxl_test_buckets", buckets=BUCKETS, num_threads=0)
    tokenizers = SDXLTokenizers.from_packaged_vocab(2, max_length=8)

    def stream(index, count, skip=0, state=None):
        it = make_train_dataset(data, tokenizers, 8, 3, process_index=index, process_count=count,
                                micro_conditioning=True, bucket_multiple=4)
        if state is not None:
            it.set_state(state)
        for _ in range(skip):
            next(it)
        batches = [next(it) for _ in range(5)]  # across the epoch boundary (2 batches/epoch)
        it.close()
        return batches

    one = stream(0, 1)
    two = [stream(0, 2), stream(1, 2)]
    for s, batch in enumerate(one):
        for key in batch:
            joined = np.concatenate([two[0][s][key], two[1][s][key]])
            np.testing.assert_array_equal(batch[key], joined)
    it = make_train_dataset(data, tokenizers, 8, 3, micro_conditioning=True, bucket_multiple=4)
    next(it), next(it)
    state = it.get_state()
    it.close()
    resumed = stream(0, 1, state=state)
    for a, b in zip(one[2:], resumed, strict=False):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(DataError, match="different input pipeline"):
        other = default_data_config(source="sdxl_test_buckets", buckets=((16, 16), (24, 16)))
        make_train_dataset(other, tokenizers, 8, 3, micro_conditioning=True).set_state(state)


def test_sample_grids_during_sdxl_training_use_the_xl_pipeline():
    config = sdxl_config()
    config.sample.update(dict(num_images=2, steps=2, sampler="euler", guidance=5.0,
                              prompts=("a shape",)))
    task = tasks.make_task(config)
    state = task.init_state(jax.random.key(0))
    grid = task.sample(state, jax.random.key(1))
    assert grid.shape == (16, 32, 3) and grid.dtype == np.uint8  # two 16x16 images side by side
    assert task._pipeline.spec.cond_stage.kind == "sdxl"
