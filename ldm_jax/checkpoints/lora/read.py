"""Reading LoRA files (kohya / A1111 and diffusers / PEFT) into checked low-rank factors.

A key is ``<module name><suffix>``; the suffixes are the formats' grammar:

| format (module names) | down (A) | up (B) | alpha |
| --- | --- | --- | --- |
| kohya / A1111 (lora_unet_*, lora_te_*) | .lora_down.weight | .lora_up.weight | .alpha |
| PEFT / diffusers (unet.*, text_encoder.*) | .lora_A.weight | .lora_B.weight | metadata |
| older diffusers (unet.*, text_encoder.*) | .lora.down.weight | .lora.up.weight | .alpha |

The module name must be in the exact table of `targets.lora_targets`. Linear layers take
down [r, in] and up [out, r]; convolutions ("LoCon", any kernel size) down [r, in, kh, kw] and up
[out, r, 1, 1]; 1x1 convs and linear layers take either form. A layer's weight moves by
scale * (alpha / r) * up @ down (alpha defaults to r; PEFT files keep alpha in the safetensors
metadata ``lora_adapter_metadata``, as diffusers writes).
"""

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ldm_jax.checkpoints.errors import CheckpointFileError, UnsupportedLoRAError
from ldm_jax.checkpoints.files import open_tensor_file
from ldm_jax.checkpoints.key_table import flatten_params, listed
from ldm_jax.checkpoints.lora.targets import (
    COMPONENTS,
    LoRATarget,
    lora_targets,
    other_architecture,
)
from ldm_jax.spec import ModelSpec

# suffix -> role; longest first, so ".lora.down.weight" is never read as another suffix
SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".alpha": "alpha",
}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (LoraConfig)


@dataclasses.dataclass(frozen=True)
class LoRALayer:
    """One adapted layer: factors in the torch layout, alpha / rank folded into `factor`."""

    name: str  # the module name as the file spells it
    target: LoRATarget
    down: np.ndarray  # [r, in] or [r, in, kh, kw]
    up: np.ndarray  # [out, r] or [out, r, 1, 1]
    factor: float  # alpha / r

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> np.ndarray:
        """factor * up @ down in OUR layout (float64): the torch weight's change through the
        target's table transform (conv OIHW -> HWIO, linear transpose, 1x1 conv -> dense)."""
        down = self.down.astype(np.float64).reshape(self.rank, -1)
        up = self.up.astype(np.float64).reshape(self.up.shape[0], self.rank)
        torch_delta = (self.factor * (up @ down)).reshape(self.up.shape[0], *self.down.shape[1:])
        return self.target.transform.to_flax(torch_delta)


@dataclasses.dataclass(frozen=True)
class LoRA:
    path: str
    layers: tuple[LoRALayer, ...]
    skipped: tuple[str, ...] = ()  # keys left out under strict=False


def read_lora(path: str | Path, spec: ModelSpec, params: Any, *, strict: bool = True) -> LoRA:
    """Read and check a LoRA file against `spec` and the shapes of `params` ({"unet", ...}).

    Keys naming no layer of the model (another architecture, LyCORIS LoHa/LoKr, DoRA) are an
    UnsupportedLoRAError listing them, or with ``strict=False`` a warning and left out. Wrong
    shapes, a factor without its partner and non-finite values are always an error naming the key.
    """
    targets = lora_targets(spec)
    try:
        with open_tensor_file(path) as tensors:
            groups, unknown = _group(tensors)
            metadata = _metadata(tensors.extras, path)
            state = {key: np.asarray(tensors[key]) for g in groups.values() for key in g.values()}
    except CheckpointFileError as error:
        raise UnsupportedLoRAError(f"cannot read LoRA file: {error}") from None
    unknown += [k for name, g in groups.items() if name not in targets for k in g.values()]
    if unknown:
        message = f"{path}: {len(unknown)} keys name no layer of this model: {_describe(unknown)}"
        if strict:
            raise UnsupportedLoRAError(message + " (strict=False leaves them out)")
        warnings.warn(message + "; left out", stacklevel=2)
    shapes = {k: tuple(v.shape) for k, v in flatten_params(params).items()}
    layers, seen = [], {}
    for name, keys in groups.items():
        if name not in targets:
            continue
        target = targets[name]
        where = (target.network, *target.flax_path)
        if where in seen:
            raise UnsupportedLoRAError(f"{path}: {name!r} and {seen[where]!r} adapt the same layer")
        seen[where] = name
        layers.append(_layer(path, name, keys, state, target, shapes, metadata))
    if not layers:
        raise UnsupportedLoRAError(f"{path}: no LoRA layer for this model in the file")
    return LoRA(str(path), tuple(layers), tuple(sorted(unknown)))


def _group(tensors: Mapping[str, Any]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{module name: {"down"/"up"/"alpha": key}}, and the keys of no known suffix."""
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in tensors:
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key[: -len(suffix)], {})[SUFFIXES[suffix]] = key
    return groups, unknown


def _describe(keys: list[str]) -> str:
    notes = {what for k in keys if (what := other_architecture(k))}
    hint = f" (keys of {', '.join(sorted(notes))}, which this model lacks)" if notes else ""
    return listed(keys) + hint


def _metadata(extras: Mapping[str, Any], path) -> dict[str, dict]:
    """{diffusers component: LoraConfig fields} from diffusers' safetensors metadata."""
    raw = extras.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        packed = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        raise UnsupportedLoRAError(f"{path}: unreadable {METADATA_KEY} metadata") from None
    if not isinstance(packed, dict):
        raise UnsupportedLoRAError(f"{path}: {METADATA_KEY} metadata is not a mapping")
    configs: dict[str, dict] = {}
    for component in COMPONENTS:
        prefix = component + "."
        fields = {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}
        for flag in ("use_rslora", "use_dora", "lora_bias"):
            if fields.get(flag):
                raise UnsupportedLoRAError(f"{path}: {prefix}{flag} LoRAs are not supported")
        configs[component] = fields
    return configs


def _alpha_from_metadata(name: str, fields: dict) -> float | None:
    """PEFT's rule: an alpha_pattern key matches a module path equal to it or ending in
    "." + it (first match wins); else lora_alpha."""
    module = name.split(".", 1)[1]
    for key, value in (fields.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({re.escape(key)})", module):
            return float(value)
    alpha = fields.get("lora_alpha")
    return None if alpha is None else float(alpha)


def _finite(path, key: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array).astype(np.float32)  # fp16 / bf16 files too
    if not np.all(np.isfinite(array)):
        raise UnsupportedLoRAError(f"{path}: {key} holds NaN or infinite values")
    return array


def _layer(path, name, keys, state, target, shapes, metadata) -> LoRALayer:
    for role in ("down", "up"):
        if role not in keys:
            other = keys.get("up" if role == "down" else "down")
            raise UnsupportedLoRAError(f"{path}: {other} has no {role} factor beside it")
    down = _finite(path, keys["down"], state[keys["down"]])
    up = _finite(path, keys["up"], state[keys["up"]])
    flax_shape = shapes.get((target.network, *target.flax_path))
    if flax_shape is None:
        raise UnsupportedLoRAError(f"{path}: {name!r} names a layer these params lack")
    weight = target.transform.torch_shape(flax_shape)  # the torch layer's weight shape
    # a 1x1 conv and a linear layer are one map: files write either form for either layer
    if down.ndim == up.ndim == 2 and weight[2:] == (1, 1):
        down, up = down[:, :, None, None], up[:, :, None, None]
    elif (
        down.ndim == up.ndim == 4 and down.shape[2:] == up.shape[2:] == (1, 1) and len(weight) == 2
    ):
        down, up = down[:, :, 0, 0], up[:, :, 0, 0]
    rank = down.shape[0] if down.ndim else 0
    linear_ok = down.ndim == 2 and up.ndim == 2
    conv_ok = down.ndim == 4 and up.ndim == 4 and up.shape[2:] == (1, 1)
    fits = (
        (linear_ok or conv_ok)
        and rank > 0
        and up.shape[1] == rank
        and (up.shape[0], *down.shape[1:]) == weight
    )
    if not fits:
        raise UnsupportedLoRAError(
            f"{path}: {keys['down']} {down.shape} and {keys['up']} {up.shape} do not make a "
            f"rank-r update of {name} (weight {weight}): need down [r, in(, kh, kw)] and up "
            "[out, r(, 1, 1)]"
        )
    alpha = None
    if "alpha" in keys:
        value = _finite(path, keys["alpha"], state[keys["alpha"]])
        if value.size != 1:
            raise UnsupportedLoRAError(
                f"{path}: {keys['alpha']} must be a scalar, got shape {value.shape}"
            )
        alpha = float(value.reshape(()))
    elif name.startswith(target.component + ".") and target.component in metadata:
        alpha = _alpha_from_metadata(name, metadata[target.component])
    factor = 1.0 if alpha is None else alpha / rank
    if not math.isfinite(factor):
        raise UnsupportedLoRAError(f"{path}: alpha of {name} is not finite")
    return LoRALayer(name, target, down, up, factor)
