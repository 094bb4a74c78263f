"""Reading textual-inversion embeddings (A1111 / civitai and diffusers files) into checked arrays.

| layout | keys | default token |
| --- | --- | --- |
| A1111 `.pt` | `{"string_to_param": {"*": [n, D]}, "name": ...}` | `name` (else the file's stem) |
| A1111 / civitai `.safetensors` | `emb_params` [n, D] | the file's stem |
| diffusers `learned_embeds.bin` / `.safetensors` | `{token: [D] or [n, D]}` | the key |
| SDXL (A1111 / civitai) | `clip_l` [n, 768], `clip_g` [n, 1280] | the file's stem |

Pickles are read weights-only (`files._torch_load`: no stored code runs). A multi-vector
embedding becomes the tokens `tok`, `tok_1`, ..., `tok_{n-1}`, as diffusers names them.
"""

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ldm_jax.checkpoints.errors import CheckpointFileError
from ldm_jax.checkpoints.files import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    _torch_load,
    open_tensor_file,
    torch_to_numpy,
)

SDXL_KEYS = ("clip_l", "clip_g")  # SDXL files: one embedding per text encoder


class TextualInversionError(ValueError):
    """A textual-inversion embedding that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class TextualInversion:
    """One embedding: its token and vectors [n, D] per text encoder ("" for SD 1.x/2.x files,
    "clip_l"/"clip_g" for SDXL files)."""

    token: str
    vectors: Mapping[str, np.ndarray]
    source: str

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def tokens(self) -> tuple[str, ...]:
        """`token`, `token_1`, ... (one per vector), diffusers' multi-vector names."""
        return (self.token, *(f"{self.token}_{i}" for i in range(1, self.num_vectors)))


def read_textual_inversion(source: Any, token: str | None = None) -> TextualInversion:
    """A TextualInversion from a file path, a state dict or an array ([D] or [n, D]; needs
    `token`). `token` overrides the file's own."""
    if isinstance(source, str | Path):
        path = Path(source)
        state, name = _read_file(path), str(path)
        default = path.stem
    else:
        state, name, default = source, f"a {type(source).__name__}", None
    if not isinstance(state, Mapping):  # a bare array
        if token is None:
            raise TextualInversionError(f"{name}: an embedding given as an array needs token=")
        vectors = {"": _vectors(state, name)}
        return TextualInversion(_checked_token(token, name), vectors, name)
    keys = sorted(map(str, state))
    if "string_to_param" in state:  # A1111 .pt
        params = state["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise TextualInversionError(
                f"{name}: A1111 string_to_param must hold '*'; it holds "
                f"{sorted(params) if isinstance(params, Mapping) else type(params).__name__}"
            )
        file_token = state.get("name") if isinstance(state.get("name"), str) else default
        vectors = {"": _vectors(params["*"], f"{name} string_to_param['*']")}
    elif keys == ["emb_params"]:  # A1111 / civitai .safetensors
        file_token, vectors = default, {"": _vectors(state["emb_params"], f"{name} emb_params")}
    elif set(keys) & set(SDXL_KEYS) and set(keys) <= set(SDXL_KEYS):
        file_token = default
        vectors = {k: _vectors(state[k], f"{name} {k}") for k in SDXL_KEYS if k in state}
        counts = {k: v.shape[0] for k, v in vectors.items()}
        if len(set(counts.values())) != 1:
            raise TextualInversionError(f"{name}: clip_l and clip_g differ in vectors: {counts}")
    elif len(keys) == 1:  # diffusers: {token: embedding}
        (file_token,) = keys
        vectors = {"": _vectors(state[file_token], f"{name} {file_token!r}")}
    else:
        raise TextualInversionError(
            f"{name}: unknown textual-inversion layout, keys {keys[:20]}; expected A1111 "
            "string_to_param/name, emb_params, SDXL clip_l/clip_g, or one {token: tensor} "
            "entry (diffusers)"
        )
    chosen = token if token is not None else file_token
    if chosen is None:
        raise TextualInversionError(f"{name}: it names no token; pass token=")
    return TextualInversion(_checked_token(chosen, name), vectors, name)


def _read_file(path: Path) -> Mapping:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise CheckpointFileError(f"{path} does not exist or is not a file")
    if suffix in SAFETENSORS_SUFFIXES:
        with open_tensor_file(path) as tensors:
            return {key: tensors[key] for key in tensors}
    if suffix in TORCH_SUFFIXES:
        return _torch_load(path)
    raise CheckpointFileError(
        f"{path}: unknown embedding file type {suffix!r}; accepted: "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


def _vectors(value: Any, name: str) -> np.ndarray:
    """float32 [n, D] from a torch tensor / array of shape [D] or [n, D], finite."""
    if type(value).__module__.startswith("torch"):
        value = torch_to_numpy(value)
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001 - anything that is no array
        raise TextualInversionError(f"{name} is no array ({type(value).__name__})") from error
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or 0 in array.shape or not np.issubdtype(array.dtype, np.number):
        raise TextualInversionError(
            f"{name} has shape {array.shape} ({array.dtype}); expected [D] or [vectors, D] numbers"
        )
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise TextualInversionError(f"{name} holds NaN or inf values")
    return array


def _checked_token(token: Any, name: str) -> str:
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise TextualInversionError(
            f"{name}: token {token!r} must be a non-empty string without surrounding spaces"
        )
    return token
