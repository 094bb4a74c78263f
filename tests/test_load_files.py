"""Reading checkpoint files: lazy safetensors / weights-only torch, bf16, and the file errors."""

import builtins
import os
import subprocess
import sys
import types

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

from ldm_jax.checkpoints import files
from ldm_jax.checkpoints.errors import CheckpointFileError
from ldm_jax.checkpoints.files import MergedTensorFiles, TorchFile, open_tensor_file

RNG = np.random.default_rng(0)
TENSORS = {
    "a.weight": RNG.standard_normal((3, 4)).astype(np.float32),
    "b.bias": RNG.standard_normal(5).astype(np.float16),
}
BF16 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
RAN = []  # what a pickled class's code would append to if the loader ever ran it


class LightningCallback:
    """Stands for pytorch_lightning's ModelCheckpoint: a class pickled next to the weights."""

    def __init__(self):
        self.best = 0.5

    def __setstate__(self, state):
        RAN.append("setstate")
        self.__dict__.update(state)


def _write_safetensors(path, tensors):
    safetensors.numpy.save_file(tensors, str(path))
    return path


def test_safetensors_is_lazy_and_exact(tmp_path, monkeypatch):
    path = _write_safetensors(tmp_path / "m.safetensors", TENSORS)
    with open_tensor_file(path) as state_dict:
        reads = []
        original = files.SafetensorsFile._read
        monkeypatch.setattr(
            files.SafetensorsFile, "_read", lambda self, k: reads.append(k) or original(self, k)
        )
        assert sorted(state_dict) == sorted(TENSORS) and len(state_dict) == 2
        assert state_dict.shape("a.weight") == (3, 4) and "b.bias" in state_dict
        assert reads == []  # keys and shapes come from the header
        for key, value in TENSORS.items():
            read = state_dict[key]
            assert read.dtype == value.dtype
            np.testing.assert_array_equal(read, value)
        assert reads == ["a.weight", "b.bias"]
        with pytest.raises(KeyError):
            state_dict["missing"]


def test_safetensors_bfloat16_without_torch_is_bit_exact(tmp_path):
    import safetensors.torch

    path = tmp_path / "bf16.safetensors"
    safetensors.torch.save_file({"w": BF16, "x": torch.ones(2)}, str(path))
    with open_tensor_file(path) as state_dict:
        value = state_dict["w"]
        assert value.dtype == ml_dtypes.bfloat16 and value.shape == (2, 3)
        np.testing.assert_array_equal(value.view(np.int16), BF16.view(torch.int16).numpy())
        np.testing.assert_array_equal(state_dict["x"], np.ones(2, np.float32))


def _save_as_lightning(obj, path):
    """torch.save with LightningCallback pickled under pytorch_lightning's module path."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    parts = name.split(".")
    modules = {".".join(parts[:i]): types.ModuleType(".".join(parts[:i])) for i in (1, 2, 3)}
    modules[name].ModelCheckpoint = LightningCallback
    saved = (LightningCallback.__module__, LightningCallback.__qualname__)
    LightningCallback.__module__, LightningCallback.__qualname__ = name, "ModelCheckpoint"
    sys.modules.update(modules)
    try:
        torch.save(obj, path)
    finally:
        LightningCallback.__module__, LightningCallback.__qualname__ = saved
        for module_name in modules:
            del sys.modules[module_name]


def test_lightning_ckpt_unwraps_state_dict_and_runs_no_pickled_code(tmp_path):
    path = tmp_path / "model.ckpt"
    state_dict = {k: torch.from_numpy(v) for k, v in TENSORS.items()} | {"c": BF16}
    callbacks = {"cb": LightningCallback()}
    _save_as_lightning(
        {"state_dict": state_dict, "global_step": 875000, "callbacks": callbacks}, path
    )
    RAN.clear()
    with open_tensor_file(path) as loaded:
        assert isinstance(loaded, TorchFile)
        assert sorted(loaded) == ["a.weight", "b.bias", "c"]
        assert loaded.extras == {"global_step": 875000}
        assert loaded.shape("c") == (2, 3)
        np.testing.assert_array_equal(loaded["a.weight"], TENSORS["a.weight"])
        assert loaded["c"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(loaded["c"].view(np.int16), BF16.view(torch.int16).numpy())
    assert RAN == []  # LightningCallback.__setstate__ never ran: a placeholder took its place


def test_plain_pt_state_dict_and_legacy_format(tmp_path):
    tensors = {k: torch.from_numpy(v) for k, v in TENSORS.items()}
    torch.save(tensors, tmp_path / "new.pt")
    torch.save(tensors, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    for name in ("new.pt", "old.pth"):
        with open_tensor_file(tmp_path / name) as loaded:
            np.testing.assert_array_equal(loaded["b.bias"], TENSORS["b.bias"])


class Evil:
    """Unpickling it calls `function("touch marker")` under a plain torch.load."""

    def __init__(self, function, marker):
        self.function, self.marker = function, marker

    def __reduce__(self):
        return (self.function, (f"touch {self.marker}",))


def test_pickled_calls_are_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "subprocess.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil(subprocess.getoutput, marker)}, path)
    with pytest.raises(CheckpointFileError, match="pickles .*getoutput, which no weights"):
        open_tensor_file(path)  # not a training-framework class: refused, not run
    path = tmp_path / "os.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil(os.system, marker)}, path)
    with pytest.raises(CheckpointFileError, match=r"os.ckpt pickles .*system, which no weights"):
        open_tensor_file(path)
    assert not marker.exists()


def test_state_dict_entries_must_be_tensors(tmp_path):
    path = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1), "note": "text"}}, path)
    with pytest.raises(CheckpointFileError, match="not tensors.*note"):
        open_tensor_file(path)


@pytest.mark.parametrize("name", ["m.safetensors", "m.ckpt"])
def test_truncated_file_is_one_clear_error(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".ckpt"):
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in TENSORS.items()}}, path)
    else:
        _write_safetensors(path, TENSORS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match=f"{name}.*truncated or corrupt"):
        open_tensor_file(path)


@pytest.mark.parametrize("name", ["m.safetensors", "m.ckpt", "empty.ckpt"])
def test_corrupt_file_is_one_clear_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else RNG.bytes(300))
    with pytest.raises(CheckpointFileError, match=name):
        open_tensor_file(path)


def test_unknown_extension_and_missing_file(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointFileError, match=r"unknown checkpoint file type '\.npz'.*\.ckpt"):
        open_tensor_file(path)
    with pytest.raises(CheckpointFileError, match="does not exist"):
        open_tensor_file(tmp_path / "nope.safetensors")


def test_ckpt_without_torch_suggests_safetensors(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    torch.save({"w": torch.ones(1)}, path)
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    with pytest.raises(CheckpointFileError, match="needs PyTorch.*safetensors"):
        open_tensor_file(path)


def test_sharded_files_merge_and_reject_duplicates(tmp_path):
    a = _write_safetensors(tmp_path / "a.safetensors", {"x": np.ones(2, np.float32)})
    b = _write_safetensors(tmp_path / "b.safetensors", {"y": np.zeros(3, np.float32)})
    with MergedTensorFiles([open_tensor_file(a), open_tensor_file(b)]) as merged:
        assert sorted(merged) == ["x", "y"] and merged.shape("y") == (3,)
        np.testing.assert_array_equal(merged["x"], np.ones(2))
    with pytest.raises(CheckpointFileError, match="'x' is in both"):
        MergedTensorFiles([open_tensor_file(a), open_tensor_file(a)])
