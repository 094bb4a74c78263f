"""Writing trained LoRA adapters as a kohya / A1111 or a diffusers / PEFT .safetensors file.

The adapters are the training tree (ldm_jax/training/lora_adapters.py): for a kernel at
``params[network][*path, "kernel"]`` of flax shape K = (*lead, in, out)

    adapters[network][*path]["lora_down"]  D_{*lead x in x r}
    adapters[network][*path]["lora_up"]    U_{*1s x r x out}

and the kernel moves by ``(alpha / r) * reshape(D @ U, K)`` with one `alpha` for the whole set.
Each adapted layer is found in the exact inverse of `targets.lora_targets`: (network, kernel
path) -> the diffusers UNet / transformers CLIP module (never the CompVis one, which only kohya's
SGM trainers write), and the factors go to the torch layout through the target's own table
transform (linear: down [r, in], up [out, r]; conv: down [r, in, kh, kw], up [out, r, 1, 1]).

| fmt | module names ("." -> "_" for kohya) | down | up | alpha |
| --- | --- | --- | --- | --- |
| kohya | lora_unet_*, lora_te_* (SDXL te1 / te2) | .lora_down.weight | .lora_up.weight | .alpha |
| peft | unet.*, text_encoder.*, text_encoder_2.* | .lora_A.weight | .lora_B.weight | metadata |

(kohya's .alpha is a float32 scalar, as kohya's own buffer, in fp16 / bf16 files too: alpha is
not rounded to the factors' dtype.)

Text-encoder modules keep transformers' ``text_model.`` level: CLIPTextModelWithProjection
(SDXL's text_encoder_2) has it, and diffusers removes it for a CLIPTextModel that lacks it
(transformers >= 5.6). The PEFT file carries diffusers' ``lora_adapter_metadata`` (a LoraConfig
per component: r, lora_alpha, rank_pattern, target_modules), so PEFT builds each layer with its
rank and scales it by alpha / r; its module patterns leave ``text_model.`` out, which PEFT's
suffix rule matches with or without that level. The kohya file carries kohya's ss_network_*
fields.
"""

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import flax
import ml_dtypes  # registers bfloat16 with numpy
import numpy as np
import safetensors.numpy

from ldm_jax.atomic import Replaceable, atomic_output
from ldm_jax.checkpoints.key_table import Transform, flatten_params
from ldm_jax.checkpoints.lora.read import METADATA_KEY
from ldm_jax.checkpoints.lora.targets import (
    KOHYA_PREFIXES,
    LoRATarget,
    lora_targets,
    text_encoders,
)
from ldm_jax.checkpoints.transformers_clip import TEXT_MODEL_PREFIX
from ldm_jax.models.factory import network_modules
from ldm_jax.models.params import abstract_params
from ldm_jax.spec import ModelSpec

FORMATS = ("kohya", "peft")
DOWN, UP = "lora_down", "lora_up"  # the adapter tree's leaf names
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
KOHYA_NETWORK_MODULE = "networks.lora"  # kohya sd-scripts' plain LoRA / LoCon network
# what overwrite may replace: another .safetensors file, never a folder
LORA_FILE = Replaceable(
    "a .safetensors file", lambda path: path.is_file() and path.suffix == ".safetensors"
)
_TORCH_RANK = {Transform.LINEAR: 2, Transform.CONV1X1_AS_LINEAR: 4, Transform.CONV: 4}


def adapter_modules(spec: ModelSpec) -> dict[tuple[str, ...], LoRATarget]:
    """{(network, *kernel path): target} for every adaptable layer of `spec`, with the diffusers
    UNet / transformers CLIP module (the inverse of `lora_targets` on those names)."""
    inverse: dict[tuple[str, ...], LoRATarget] = {}
    for name, target in lora_targets(spec).items():
        if name != f"{target.component}.{target.module}":
            continue  # kohya spellings, CompVis modules, text encoders without text_model.
        where = (target.network, *target.flax_path)
        if where in inverse:
            raise ValueError(f"{inverse[where].module!r} and {target.module!r} both adapt {where}")
        inverse[where] = target
    return inverse


def lora_state_dict(
    spec: ModelSpec,
    adapters: Any,
    alpha: float,
    fmt: str,
    *,
    dtype=np.float32,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors in the torch layout, safetensors metadata) of `adapters` in format `fmt`
    ("kohya" or "peft"); the factors in `dtype` (float32, float16 or bfloat16).

    Every adapter must sit at an adaptable kernel of `spec` with down (*lead, in, r) and up
    (*1s, r, out) for that kernel's K = (*lead, in, out); anything else is a ValueError naming
    the adapter."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; allowed: {', '.join(FORMATS)}")
    dtype = _checked_dtype(dtype)
    alpha = _checked_alpha(alpha)
    layers = _layers(spec, adapters)
    if fmt == "kohya":
        return _kohya(spec, layers, alpha, dtype)
    return _peft(layers, alpha, dtype)


def save_lora(
    path: str | os.PathLike,
    spec: ModelSpec,
    adapters: Any,
    alpha: float,
    fmt: str = "peft",
    *,
    dtype=np.float32,
    overwrite: bool = False,
) -> Path:
    """Write `adapters` (see `lora_state_dict`) to the .safetensors file `path`, atomically: an
    existing file is replaced only with `overwrite` (a folder never), and nothing is left behind
    when writing fails."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"a LoRA is written as one .safetensors file; got destination {path} "
            "(allowed: a path ending in .safetensors)"
        )
    tensors, metadata = lora_state_dict(spec, adapters, alpha, fmt, dtype=dtype)
    with atomic_output(path, overwrite=overwrite, replaceable=LORA_FILE) as temporary:
        safetensors.numpy.save_file(tensors, str(temporary), metadata=metadata)
    return path


def _checked_dtype(dtype) -> np.dtype:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"LoRA factors are written as {', '.join(DTYPES)}; got dtype {dtype!r}")
    return np.dtype(DTYPES[name])


def _checked_alpha(alpha) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0; got {alpha!r}")
    return value


def _layers(spec, adapters) -> list[tuple[LoRATarget, np.ndarray, np.ndarray]]:
    """(target, down_torch, up_torch) per adapter, in float32, checked against `spec`."""
    tree = flax.core.meta.unbox(adapters)
    if isinstance(tree, flax.core.FrozenDict):
        tree = tree.unfreeze()
    if not isinstance(tree, dict) or not tree:
        raise ValueError("no LoRA adapters given: need {network: {...path: {lora_down, lora_up}}}")
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for leaf_path, value in flax.traverse_util.flatten_dict(tree).items():
        *where, role = leaf_path
        if role not in (DOWN, UP):
            raise ValueError(
                f"adapter leaf {'/'.join(leaf_path)}: the leaves are {DOWN!r} and {UP!r} only"
            )
        groups.setdefault(tuple(where), {})[role] = value
    modules = adapter_modules(spec)
    unknown = [where for where in groups if (*where, "kernel") not in modules]
    if unknown:
        raise ValueError(
            f"{len(unknown)} adapters sit at no LoRA-adaptable kernel of this model: "
            f"{', '.join('/'.join(w) for w in sorted(unknown)[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} (allowed: the Dense / Conv kernels that "
            "diffusers' UNet and transformers' CLIP text encoders name, see "
            "ldm_jax.checkpoints.lora.lora_targets)"
        )
    shapes = _kernel_shapes(spec, {where[0] for where in groups})
    layers = []
    for where, factors in sorted(groups.items()):
        name = "/".join(where)
        for role in (DOWN, UP):
            if role not in factors:
                raise ValueError(f"adapter {name} has no {role!r} beside its other factor")
        target = modules[(*where, "kernel")]
        down = np.asarray(factors[DOWN], np.float32)
        up = np.asarray(factors[UP], np.float32)
        *lead, fan_in, fan_out = shapes[(*where, "kernel")]
        rank = down.shape[-1] if down.ndim else 0
        want_down, want_up = (*lead, fan_in, rank), (*(1 for _ in lead), rank, fan_out)
        if rank < 1 or down.shape != want_down or up.shape != want_up:
            raise ValueError(
                f"adapter {name}: lora_down {down.shape} and lora_up {up.shape} do not make a "
                f"rank-r update of its kernel {(*lead, fan_in, fan_out)}: need lora_down "
                "(*lead, in, r) and lora_up (*1s, r, out) with r >= 1"
            )
        down_torch, up_torch = target.transform.to_torch(down), target.transform.to_torch(up)
        if down_torch.ndim != _TORCH_RANK.get(target.transform, -1):
            raise ValueError(f"adapter {name}: {target.transform.value} layers take no LoRA")
        layers.append((target, down_torch, up_torch))
    return layers


def _kernel_shapes(spec, networks: set[str]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{(network, *path): shape} of the params of `networks` (abstract: no memory)."""
    modules = {n: m for n, m in network_modules(spec).items() if n in networks}
    abstract = {n: abstract_params(module, *inputs) for n, (module, inputs) in modules.items()}
    return {k: tuple(v.shape) for k, v in flatten_params(abstract).items()}


def _cast(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow is the error below
        cast = np.ascontiguousarray(array.astype(dtype))
    if not np.all(np.isfinite(cast.astype(np.float32))):
        raise ValueError(f"{name} holds NaN or infinite values in {dtype.name}")
    return cast


def _kohya_name(target: LoRATarget, prefixes: dict[str, str]) -> str:
    return prefixes[target.component] + target.module.replace(".", "_")


def _kohya(spec, layers, alpha, dtype):
    prefixes = dict(KOHYA_PREFIXES) | {comp: kohya for _, kohya, comp, _ in text_encoders(spec)}
    names = lora_targets(spec)
    tensors = {}
    for target, down, up in layers:
        name = _kohya_name(target, prefixes)
        back = names.get(name)
        if back is None or (back.network, back.flax_path) != (target.network, target.flax_path):
            raise ValueError(f"kohya name {name!r} does not read back as {target.module!r}")
        tensors[f"{name}.lora_down.weight"] = _cast(f"{name}.lora_down.weight", down, dtype)
        tensors[f"{name}.lora_up.weight"] = _cast(f"{name}.lora_up.weight", up, dtype)
        tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)  # never rounded to fp16
    ranks = {down.shape[0] for _, down, _ in layers}
    metadata = {
        "format": "pt",
        "ss_network_module": KOHYA_NETWORK_MODULE,
        # kohya's resize_lora writes "Dynamic" when the ranks differ per layer
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alpha),
    }
    return tensors, metadata


def _peft(layers, alpha, dtype):
    tensors, configs = {}, {}
    by_component: dict[str, list] = {}
    for target, down, up in layers:
        name = f"{target.component}.{target.module}"
        tensors[f"{name}.lora_A.weight"] = _cast(f"{name}.lora_A.weight", down, dtype)
        tensors[f"{name}.lora_B.weight"] = _cast(f"{name}.lora_B.weight", up, dtype)
        # PEFT matches a pattern as a suffix after "."; without text_model. it fits both layouts
        module = target.module
        if target.component != "unet":
            module = module.removeprefix(TEXT_MODEL_PREFIX)
        by_component.setdefault(target.component, []).append((module, down.shape[0]))
    for component, modules in sorted(by_component.items()):
        r = Counter(rank for _, rank in modules).most_common(1)[0][0]  # as diffusers picks it
        configs |= {
            f"{component}.r": r,
            f"{component}.lora_alpha": alpha,
            # regexes for PEFT (`(.*\.)?(key)$`): escaped, so each names its module only
            f"{component}.rank_pattern": {re.escape(m): k for m, k in modules if k != r},
            f"{component}.target_modules": sorted(m for m, _ in modules),
        }
    metadata = {"format": "pt", METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True)}
    return tensors, metadata
