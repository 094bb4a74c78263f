"""config.mesh: the device mesh of a training run, and its checks (no jax import, so train.py
rejects a bad mesh before jax starts).

    mesh.axes                axis names, outermost first, e.g. ("data", "fsdp", "tensor")
    mesh.shape               ICI shape: devices along each axis within one slice (one -1 = the
                             rest of the slice's devices)
    mesh.dcn_shape           DCN shape: slices along each axis (default all ones = one slice; one
                             -1 = the rest of the slices)
    mesh.process_is_granule  True: each process is a slice (CPU multi-process runs, GPU clusters);
                             False: slices are TPU slices (the devices' slice_index)

Axis i of the mesh has shape[i] * dcn_shape[i] devices, slice-major: a slice's devices are
contiguous along every axis that dcn_shape splits. Keep the DCN on the outermost axis ("data",
or "fsdp" when data is 1) and the chatty "tensor" axis inside a slice.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import ml_collections

AXES = ("data", "fsdp", "tensor")


def mesh_config(**overrides) -> ml_collections.ConfigDict:
    """The default config.mesh block: batch over data x fsdp, params over fsdp, one slice."""
    values = {"axes": AXES, "shape": (1, -1, 1), "dcn_shape": (1, 1, 1),
              "process_is_granule": False}
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown config.mesh keys {unknown}; allowed: {sorted(values)}")
    return ml_collections.ConfigDict({**values, **overrides})


def check_axes(axes: Sequence[str]) -> tuple[str, ...]:
    axes = tuple(axes)
    if not axes or not all(isinstance(a, str) and a for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mesh.axes={axes}: must be unique non-empty names, e.g. {AXES}")
    return axes


def check_sizes(key: str, sizes: Sequence[int], axes: Sequence[str]) -> tuple[int, ...]:
    """`sizes` as ints, one per axis, each >= 1 or -1 (at most one -1)."""
    sizes = tuple(sizes)
    if len(sizes) != len(axes):
        raise ValueError(f"{key}={sizes} must have one size per mesh axis {tuple(axes)}")
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes):
        raise ValueError(f"{key}={sizes} must be integers (>= 1, or one -1 for the rest)")
    sizes = tuple(int(s) for s in sizes)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{key}={sizes}: sizes must be >= 1 with at most one -1 (the rest)")
    return sizes


def fill_sizes(key: str, sizes: tuple[int, ...], total: int, what: str,
               hint: str = "") -> tuple[int, ...]:
    """`sizes` (checked) with its -1 filled so that the product is `total` `what`s; `hint` ends
    the error."""
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ValueError(f"{key}={sizes}: the fixed sizes multiply to {known}, which does "
                             f"not divide the {total} {what}{hint}")
        return tuple(total // known if s == -1 else s for s in sizes)
    if known != total:
        verb = "is" if total == 1 else "are"
        raise ValueError(f"{key}={sizes} needs {known} {what} but {total} {verb} available; "
                         f"use -1 for one axis to take the rest{hint}")
    return sizes


def mesh_settings(mesh) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], bool]:
    """(axes, ICI shape, DCN shape, process_is_granule) of a config.mesh block, checked; blocks
    written before dcn_shape existed mean one slice."""
    axes = check_axes(mesh.axes)
    shape = check_sizes("mesh.shape", mesh.shape, axes)
    dcn = mesh.get("dcn_shape", None)
    dcn = (1,) * len(axes) if dcn is None else check_sizes("mesh.dcn_shape", dcn, axes)
    granule = mesh.get("process_is_granule", False)
    if not isinstance(granule, bool):
        raise ValueError(f"mesh.process_is_granule={granule!r} must be True or False")
    return axes, shape, dcn, granule
