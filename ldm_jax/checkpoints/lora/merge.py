"""Merging LoRAs into a parameter tree on the host: W' = W + sum_i scale_i * delta_i.

Only the adapted kernels change; every other leaf of the returned tree is the base's own object,
so the compiled sampler (params are its arguments) sees the same shapes, dtypes and shardings
and never recompiles, and dropping every LoRA gives back the base tree itself (bit-exact).
"""

from collections.abc import Callable, Iterable
from typing import Any

import flax
import numpy as np

from ldm_jax.checkpoints.lora.read import LoRA


def merged_kernels(
    base_leaf: Callable[[tuple[str, ...]], np.ndarray], loras: Iterable[tuple[LoRA, float]]
) -> dict[tuple[str, ...], np.ndarray]:
    """{(network, *kernel path): merged kernel} for every layer some LoRA adapts; `base_leaf`
    gives a kernel's base value as numpy. Sums in float64, then casts to the base dtype."""
    sums: dict[tuple[str, ...], np.ndarray] = {}
    for lora, scale in loras:
        for layer in lora.layers:
            where = (layer.target.network, *layer.target.flax_path)
            update = float(scale) * layer.delta()
            sums[where] = sums[where] + update if where in sums else update
    merged = {}
    for where, update in sums.items():
        base = np.asarray(base_leaf(where))
        merged[where] = (base.astype(np.float64) + update).astype(base.dtype)
    return merged


def replace_leaves(params: Any, leaves: dict[tuple[str, ...], Any]) -> Any:
    """`params` (nested dicts) with the leaves at these full paths replaced; the rest shared."""
    flat = flax.traverse_util.flatten_dict(params)
    missing = [path for path in leaves if path not in flat]
    if missing:
        raise KeyError(f"no parameter at {['/'.join(p) for p in missing]}")
    flat.update(leaves)
    return flax.traverse_util.unflatten_dict(flat)
