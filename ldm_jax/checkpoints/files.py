"""Reading PyTorch checkpoint files as lazy {key: numpy array} mappings.

`.safetensors` files are validated with safetensors' `safe_open(framework="numpy")` and read
without torch; pickled `.ckpt`/`.pt`/`.pth`/`.bin` files only with
`torch.load(weights_only=True, mmap=True)`: no code stored in a pickle ever runs. Values are read
one tensor at a time, when a key is looked up, so converting a safetensors checkpoint holds about
one copy of its parameters plus one tensor (a memory-mapped .ckpt adds its touched pages).

PyTorch Lightning checkpoints (CompVis `.ckpt` files, the LDM zoo `model.ckpt`s) also pickle
training objects (`callbacks` holding a `ModelCheckpoint`, hyper-parameters); the weights-only
unpickler refuses their classes. Classes of known training-framework modules are replaced by inert
placeholders (`torch.serialization.safe_globals`), so the load stays weights-only and the objects
are dropped; any other pickled global (e.g. a function call) is refused with an error.
"""

import json
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ldm_jax.checkpoints.errors import CheckpointFileError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_PLACEHOLDER_ROUNDS = 8
# Modules whose pickled objects (callbacks, hyper-parameters, numpy scalars in them) training
# checkpoints carry besides their tensors. Only these become placeholders; any other global is a
# refusal, since a weights file has no reason to pickle, e.g., `subprocess.getoutput`.
_PLACEHOLDER_MODULES = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
    "numpy.",
    "_codecs.encode",
    "argparse.Namespace",
    "pathlib.",
    "ldm.",
    "taming.",
)
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}



class TensorFile(Mapping):
    """A checkpoint's state dict; tensors are read (as numpy arrays) only when looked up.

    `shape(key)` answers without reading the tensor; `extras` holds a Lightning checkpoint's
    small top-level entries (e.g. `global_step`); `close()` releases the file.
    """

    def __init__(self, path: Path, keys: list[str], extras: dict[str, Any] | None = None):
        self.path = path
        self._keys = keys
        self._key_set = frozenset(keys)
        self.extras = extras or {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._key_set:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(TensorFile):
    """A .safetensors file: validated by safetensors' `safe_open(framework="numpy")`, tensors
    then read with positioned reads at the header's offsets.

    Reading through safetensors' memory map would leave every page read resident in this
    process until the file is closed (a second copy of the checkpoint in RSS); plain reads
    keep only the tensor being converted. They also give bfloat16, which safetensors' numpy
    backend cannot name, bit-exact.
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        try:  # checks the header and that the data covers every tensor (truncation)
            with safe_open(str(path), framework="numpy") as handle:
                metadata = dict(handle.metadata() or {})
        except SafetensorError as error:
            raise CheckpointFileError(
                f"{path} is not a readable .safetensors file ({error}); it may be truncated or "
                "corrupt"
            ) from None
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        (length,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(length))
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        unknown = {info["dtype"] for info in header.values()} - _SAFETENSORS_DTYPES.keys()
        if unknown:
            raise CheckpointFileError(f"{path}: unsupported tensor dtypes {sorted(unknown)}")
        self._header = header
        super().__init__(path, list(header), metadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def _read(self, key: str) -> np.ndarray:
        info = self._header[key]
        start, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        self._file.seek(self._data_start + start)
        data = np.fromfile(self._file, dtype=dtype, count=(end - start) // dtype.itemsize)
        return data.reshape(info["shape"])

    def close(self) -> None:
        self._file.close()


class TorchFile(TensorFile):
    """A pickled state dict (optionally under "state_dict", as Lightning saves it)."""

    def __init__(self, path: Path):
        checkpoint = _torch_load(path)
        state_dict = checkpoint
        extras = {}
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
            state_dict = checkpoint["state_dict"]
            extras = {
                k: v for k, v in checkpoint.items() if isinstance(v, int | float | str | bool)
            }
        if not isinstance(state_dict, Mapping):
            raise CheckpointFileError(
                f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors"
            )
        import torch

        not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if not_tensors:
            raise CheckpointFileError(
                f"{path}: state dict entries that are not tensors: {sorted(not_tensors)[:10]}"
            )
        self._tensors = state_dict
        super().__init__(path, [str(k) for k in state_dict], extras)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def _read(self, key: str) -> np.ndarray:
        return torch_to_numpy(self._tensors[key])

    def close(self) -> None:
        self._tensors = {}


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy, bfloat16 bit-exact (numpy itself has no bfloat16)."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _Placeholder:
    """Stands in for a class a checkpoint pickles besides its tensors; runs no stored code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _torch_load(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointFileError(
            f"reading {path.name} needs PyTorch (pickled checkpoints are read with "
            "torch.load(weights_only=True)); install torch, or use the checkpoint's .safetensors "
            "version, which needs no torch"
        ) from None
    import pickle

    zipped = zipfile.is_zipfile(path)
    placeholders: list[tuple[type, str]] = []
    # Non-zip (legacy) files cannot be memory-mapped; they are read in full.
    kwargs = dict(map_location="cpu", weights_only=True, mmap=zipped)
    for _ in range(_MAX_PLACEHOLDER_ROUNDS):
        try:
            with torch.serialization.safe_globals(placeholders):
                return torch.load(path, **kwargs)
        except pickle.UnpicklingError as error:
            missing = _unsupported_globals(path, error, zipped)
            new = [name for name in missing if name not in {n for _, n in placeholders}]
            refused = [n for n in new if not n.startswith(_PLACEHOLDER_MODULES)]
            if refused:
                raise CheckpointFileError(
                    f"{path} pickles {', '.join(refused)}, which no weights file needs; refusing "
                    "to read it (it may try to run code). Convert it to .safetensors where you "
                    "trust its origin."
                ) from None
            if not new:
                raise CheckpointFileError(
                    f"{path} cannot be read as a weights-only checkpoint: {_first_line(error)}"
                ) from None
            placeholders += [(type(n.rsplit(".", 1)[-1], (_Placeholder,), {}), n) for n in new]
        except Exception as error:  # noqa: BLE001 - whatever a damaged pickle/zip raises
            raise CheckpointFileError(
                f"{path} is not a readable PyTorch checkpoint ({_first_line(error)}); it may be "
                "truncated or corrupt"
            ) from None
    raise CheckpointFileError(f"{path} pickles too many non-tensor classes to skip")


def _unsupported_globals(path: Path, error: Exception, zipped: bool) -> list[str]:
    """Names of the pickled classes the weights-only unpickler refused."""
    import torch

    if zipped:
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - a corrupt pickle: report the original error
            return []
    text = str(error)  # legacy files: the refused name is in the message
    return _REFUSED_GLOBAL.findall(text)[:1]


# How torch names the global its weights-only unpickler refused (the wording varies by version).
_REFUSED_GLOBAL = re.compile(
    r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|Unsupported class)\s+([\w.]+[\w])"
)
# Lines of torch's message that advise loading with weights_only=False: never repeated here.
_TORCH_ADVICE = ("weights_only", "weights only", "check the documentation", "file an issue")


def _first_line(error: Exception) -> str:
    """The reason in a torch load error, without torch's advice to retry unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not any(a in line.lower() for a in _TORCH_ADVICE)]
    return f"{type(error).__name__}: {lines[0] if lines else 'not a weights-only pickle'}"


def open_tensor_file(path: str | Path) -> TensorFile:
    """A lazy state dict of a `.safetensors` or pickled PyTorch checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsFile(path)
    if suffix in TORCH_SUFFIXES:
        return TorchFile(path)
    raise CheckpointFileError(
        f"{path}: unknown checkpoint file type {suffix!r}; accepted: "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


class MergedTensorFiles(Mapping):
    """Several tensor files (a sharded checkpoint) seen as one state dict."""

    def __init__(self, files: list[TensorFile]):
        self.files = files
        self._owner: dict[str, TensorFile] = {}
        for f in files:
            for key in f:
                if key in self._owner:
                    raise CheckpointFileError(
                        f"{key!r} is in both {self._owner[key].path} and {f.path}"
                    )
                self._owner[key] = f

    def __getitem__(self, key: str) -> np.ndarray:
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, key: object) -> bool:
        return key in self._owner

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_params(table, state_dict: Mapping[str, Any], abstract: Any, dtype=None, *, source=None):
    """Parameters shaped like `abstract` from a state dict through a KeyTable, as jax arrays.

    Tensors are read and transformed one at a time (`KeyTable.to_flax`), then moved to jax one
    leaf at a time, so the numpy copies are released as the jax ones are made. `dtype` casts
    every parameter (e.g. jnp.bfloat16); None keeps the stored dtypes. `source` prefixes errors.
    """
    import flax
    import jax.numpy as jnp

    from ldm_jax.checkpoints.errors import CheckpointMismatchError

    try:
        tree = table.to_flax(state_dict, abstract, dtype=dtype)
    except CheckpointMismatchError as error:
        if source is None:
            raise
        raise CheckpointMismatchError(f"{source}: {error}") from None
    flat = flax.traverse_util.flatten_dict(tree)
    del tree
    converted = {}
    for path in list(flat):
        converted[path] = jnp.asarray(flat.pop(path))
    return flax.traverse_util.unflatten_dict(converted)
