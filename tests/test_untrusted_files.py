"""Files from strangers: lying specs and configs, escaping shard names, local paths mistaken for
hub ids, and pickles the weights-only reader refuses are each one project error, at once."""

import json
import os
import shutil
import time

import pytest
import safetensors.numpy
import torch
from support.checkpoint_files import export_compvis, with_value
from support.tiny_pipelines import sd_pipeline
from support.tiny_specs import SD1_LIKE

from ldm_jax.checkpoints import load_checkpoint
from ldm_jax.checkpoints.compvis.export import SPEC_METADATA_KEY
from ldm_jax.checkpoints.errors import ArchitectureError, CheckpointFileError
from ldm_jax.checkpoints.files import open_tensor_file
from ldm_jax.checkpoints.load import is_hub_id
from ldm_jax.cli.common import exists_or_hub_id


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(tensors, spec dict) of a tiny ldm_jax CompVis export."""
    return export_compvis(SD1_LIKE, tmp_path_factory.mktemp("export") / "tiny.safetensors")


def _write(path, tensors, spec_data):
    text = spec_data if isinstance(spec_data, str) else json.dumps(spec_data)
    metadata = {SPEC_METADATA_KEY: text}
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "where, value, named",
    [
        (("first_stage", "ch"), "abc", "AutoencoderConfig.ch='abc'"),
        (("first_stage", "ch_mult"), [1, "x"], "AutoencoderConfig.ch_mult"),
        (("unet", "num_res_blocks"), None, "UNetConfig.num_res_blocks=None"),
        (("unet", "model_channels"), True, "UNetConfig.model_channels=True"),
        (("cond_stage", "config", "num_heads"), 0.5, "CLIPTextConfig.num_heads=0.5"),
        (("diffusion", "num_timesteps"), "1000", "DiffusionSpec.num_timesteps='1000'"),
        (("diffusion", "scale_factor"), float("nan"), "DiffusionSpec.scale_factor=nan"),
        (("unet", "model_channels"), 2**40, "UNetConfig.model_channels"),
    ],
)
def test_spec_metadata_of_the_wrong_type_is_one_error(tmp_path, exported, where, value, named):
    tensors, spec = exported
    path = _write(tmp_path / "bad.safetensors", tensors, with_value(spec, where, value))
    with pytest.raises(CheckpointFileError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and named in message and "allowed" in message


@pytest.mark.parametrize("data", ["[1, 2]", '"x"', "{", "[" * 100000, '{"_type": 3}'])
def test_spec_metadata_that_is_no_spec_is_one_error(tmp_path, exported, data):
    path = _write(tmp_path / "bad.safetensors", exported[0], data)
    with pytest.raises(CheckpointFileError, match=SPEC_METADATA_KEY):
        load_checkpoint(path)


def test_spec_metadata_declaring_a_huge_network_fails_at_once(tmp_path, exported):
    tensors, spec = exported
    huge = with_value(spec, ("cond_stage", "config", "num_layers"), 10**6)
    path = _write(tmp_path / "huge.safetensors", tensors, huge)
    start = time.perf_counter()
    with pytest.raises(ArchitectureError, match=r"1000000 layers .*num_layers.* only \d+ tensors"):
        load_checkpoint(path)
    assert time.perf_counter() - start < 5
    wide = with_value(spec, ("unet", "model_channels"), 2**22)
    path = _write(tmp_path / "wide.safetensors", tensors, wide)
    with pytest.raises(ArchitectureError, match="model_channels=4194304 but the largest tensor"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "pipeline"
    sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def folder(tmp_path, sd_folder):
    copy = tmp_path / "pipeline"
    shutil.copytree(sd_folder, copy)
    return copy


def _edit(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "component, field, value",
    [
        ("unet/config.json", "block_out_channels", "abc"),
        ("unet/config.json", "layers_per_block", None),
        ("unet/config.json", "cross_attention_dim", "64"),
        ("unet/config.json", "down_block_types", 3),
        ("vae/config.json", "latent_channels", [4]),
        ("vae/config.json", "block_out_channels", []),
        ("vae/config.json", "scaling_factor", "0.18"),
        ("text_encoder/config.json", "num_hidden_layers", "2"),
        ("text_encoder/config.json", "hidden_size", -64),
        ("scheduler/scheduler_config.json", "num_train_timesteps", "1000"),
        ("scheduler/scheduler_config.json", "beta_start", None),
        ("scheduler/scheduler_config.json", "beta_end", "0.012"),
    ],
)
def test_diffusers_config_of_the_wrong_type_is_one_error(folder, component, field, value):
    _edit(folder / component, **{field: value})
    with pytest.raises(ArchitectureError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert str(folder / component) in message and field in message and "allowed" in message


def test_diffusers_config_declaring_a_huge_text_encoder_fails_at_once(folder):
    _edit(folder / "text_encoder/config.json", num_hidden_layers=10**6)
    start = time.perf_counter()
    with pytest.raises(ArchitectureError, match=r"text_encoder/config.json.*1000000 layers"):
        load_checkpoint(folder)
    assert time.perf_counter() - start < 5


def _shard(folder, name):
    """The unet's weights, moved aside, and an index naming `name` as their one shard."""
    unet = folder / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    with open_tensor_file(weights) as f:
        index = {"metadata": {}, "weight_map": {k: name for k in f}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    moved = folder / "weights.safetensors"
    weights.rename(moved)
    return moved


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "subfolder"])
def test_shards_outside_their_folder_are_refused(folder, tmp_path, how):
    outside = tmp_path / "OUTSIDE.safetensors"
    name = {
        "dotdot": "../../OUTSIDE.safetensors",
        "absolute": str(outside),
        "symlink": "link.safetensors",
        "subfolder": "sub/OUTSIDE.safetensors",
    }[how]
    _shard(folder, name).rename(outside)
    if how == "symlink":
        os.symlink(outside, folder / "unet" / name)
    with pytest.raises(CheckpointFileError, match="shard .* is not allowed; allowed: the name of"):
        load_checkpoint(folder)


def test_a_shard_inside_its_folder_still_loads(folder):
    name = "diffusion_pytorch_model-00001-of-00001.safetensors"
    _shard(folder, name).rename(folder / "unet" / name)
    assert load_checkpoint(folder).spec.unet is not None


@pytest.mark.parametrize(
    "name",
    [
        "x.safetensors",
        "dir/name.safetensors",
        "org/model.ckpt",
        "org/model.PTH",
        "org/v1.yaml",
        "./org/name",
        "~/org/name",
        "a/b/c",
        "/org/name",
    ],
)
def test_missing_local_looking_paths_are_never_sent_to_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError(f"{name} was sent to the hub")

    monkeypatch.setattr("ldm_jax.checkpoints.load.download_from_hub", no_hub)
    with pytest.raises(CheckpointFileError, match="no such file"):
        load_checkpoint(name)
    assert not is_hub_id(name) and not exists_or_hub_id(name)


def test_only_bare_org_name_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("CompVis/stable-diffusion-v1-4") and exists_or_hub_id("org/name.v2")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text("")  # a local path of that name wins
    assert not is_hub_id("org/name")


class _Call:
    def __init__(self, function):
        self.function = function

    def __reduce__(self):
        return (self.function, ())


@pytest.mark.parametrize("legacy", [False, True])
def test_refused_pickles_name_the_global_and_never_suggest_unsafe_loading(tmp_path, legacy):
    path = tmp_path / "model.ckpt"
    state = {"a": torch.zeros(2), "x": _Call(os.getcwd)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointFileError) as info:
        open_tensor_file(path)
    message = str(info.value)
    assert "getcwd" in message and "weights_only" not in message


def test_unreadable_pickles_never_suggest_unsafe_loading(tmp_path):
    import pickle

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(CheckpointFileError) as info:
        open_tensor_file(path)
    assert "weights_only" not in str(info.value) and "False" not in str(info.value)
