"""Device meshes for training: topology-aware within a slice, slice-major across slices.

One slice: `mesh_utils.create_device_mesh` maps the axes onto the TPU torus (the innermost axis
gets the most links) or orders GPUs by id. Several slices (TPU multislice, or processes with
mesh.process_is_granule): `mesh_utils.create_hybrid_device_mesh`, so axis i is dcn_shape[i]
blocks of shape[i] devices and only the axes dcn_shape splits cross the slow network (DCN).
CPU devices carry no topology: within a slice the mesh is the devices reshaped, as it always was.
Where mesh_utils cannot place a shape on the hardware it raises; the mesh then falls back to that
plain order and says so in a warning (correct, possibly slower collectives).
The config keys are described in ldm_jax/training/mesh_config.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from ldm_jax.training.mesh_config import check_axes, check_sizes, fill_sizes, mesh_settings

log = logging.getLogger(__name__)

_TOPOLOGY_PLATFORMS = ("tpu", "gpu")  # where mesh_utils orders devices by more than their list
_MESH_UTILS_ERRORS = (ValueError, NotImplementedError, AssertionError)  # what it raises


def _object_array(devices) -> np.ndarray:
    array = np.empty(len(devices), dtype=object)
    array[:] = list(devices)
    return array


def slices(devices: Sequence, process_is_granule: bool) -> list[list]:
    """`devices` grouped by slice, in slice order: by process_index when `process_is_granule`,
    else by slice_index (TPU); devices without a slice_index are one slice."""
    attr = "process_index" if process_is_granule else "slice_index"
    if not hasattr(devices[0], attr):
        return [list(devices)]
    groups: dict[int, list] = {}
    for device in devices:
        groups.setdefault(getattr(device, attr), []).append(device)
    return [groups[key] for key in sorted(groups)]


def _slice_grid(ici: tuple[int, ...], devices: Sequence) -> tuple[np.ndarray, str]:
    platform = devices[0].platform
    if platform not in _TOPOLOGY_PLATFORMS:
        return _object_array(devices).reshape(ici), f"plain order ({platform}: no topology)"
    try:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        return grid, "mesh_utils.create_device_mesh"
    except _MESH_UTILS_ERRORS as error:
        log.warning("mesh_utils.create_device_mesh%s failed on %d %s devices (%s): using them "
                    "in plain order, which may make collectives slower", ici, len(devices),
                    devices[0].device_kind, error)
        return _object_array(devices).reshape(ici), "plain order (create_device_mesh failed)"


def _hybrid_grid(ici, dcn, groups, process_is_granule) -> tuple[np.ndarray, str]:
    devices = [d for group in groups for d in group]
    try:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=process_is_granule,
            allow_split_physical_axes=True)
        inner = "" if devices[0].platform in _TOPOLOGY_PLATFORMS else (
            f"; {devices[0].platform}: no topology, each slice in plain order")
        return grid, f"mesh_utils.create_hybrid_device_mesh{inner}"
    except _MESH_UTILS_ERRORS as error:
        log.warning("mesh_utils.create_hybrid_device_mesh(%s, %s) failed on %d %s devices (%s): "
                    "each slice's devices in plain order, which may make collectives slower",
                    ici, dcn, len(devices), devices[0].device_kind, error)
    # mesh_utils' own assembly: block (i, j, ...) of the mesh is slice number (i, j, ...) of dcn
    blocks = np.empty(len(groups), dtype=object)
    blocks[:] = [_object_array(group).reshape(ici) for group in groups]
    return np.block(blocks.reshape(dcn).tolist()), "slices in plain order (mesh_utils failed)"


def device_grid(axes: Sequence[str], shape: Sequence[int], dcn_shape: Sequence[int] | None,
                devices: Sequence, process_is_granule: bool = False) -> tuple[np.ndarray, str]:
    """(array of `devices` with shape shape[i] * dcn_shape[i], how it was built).

    `shape`: devices per slice along each axis; `dcn_shape`: slices along each axis (None: one
    slice); one -1 in each takes the rest. Errors name the values and what is allowed.
    """
    axes = check_axes(axes)
    shape = check_sizes("mesh.shape", shape, axes)
    dcn = (1,) * len(axes) if dcn_shape is None else check_sizes("mesh.dcn_shape", dcn_shape, axes)
    devices = list(devices)
    groups = slices(devices, process_is_granule)
    if not process_is_granule and math.prod(dcn) == 1:  # the default: one slice
        if len(groups) > 1:
            log.warning("the %d devices span %d slices but mesh.dcn_shape=%s is one slice: set "
                        "mesh.dcn_shape (e.g. %s) to split an outer axis over the slices",
                        len(devices), len(groups), dcn, (-1,) + (1,) * (len(axes) - 1))
        ici = fill_sizes("mesh.shape", shape, len(devices), "devices")
        grid, how = _slice_grid(ici, devices)
        return grid, f"{how}; one slice {ici}"

    unit = "process" if process_is_granule else "slice"
    kind = f"{unit}es" if process_is_granule else f"{unit}s"
    hint = "" if process_is_granule or hasattr(devices[0], "slice_index") else (
        f" ({devices[0].platform} devices have no slice_index: mesh.process_is_granule=True "
        "makes each process a slice)")
    dcn = fill_sizes("mesh.dcn_shape", dcn, len(groups), kind, hint)
    sizes = sorted({len(group) for group in groups})
    if len(sizes) > 1:
        raise ValueError(f"the {len(groups)} {kind} hold unequal numbers of devices {sizes}: a "
                         "hybrid mesh needs the same number in each")
    ici = fill_sizes("mesh.shape", shape, sizes[0], f"devices per {unit}")
    grid, how = (_slice_grid(ici, devices) if len(groups) == 1
                 else _hybrid_grid(ici, dcn, groups, process_is_granule))
    return grid, f"{how}; ici {ici} x dcn {dcn} ({len(groups)} {kind})"


def make_pod_mesh(axes: Sequence[str], shape: Sequence[int], dcn_shape: Sequence[int] | None = None,
                  process_is_granule: bool = False, devices=None) -> Mesh:
    """The Mesh of `devices` (default: all) with named `axes`: `shape` within each slice (ICI),
    `dcn_shape` slices (DCN); see device_grid."""
    devices = jax.devices() if devices is None else devices
    grid, how = device_grid(axes, shape, dcn_shape, devices, process_is_granule)
    log.info("mesh %s over %d devices: %s", dict(zip(axes, grid.shape, strict=True)), grid.size,
             how)
    return Mesh(grid, tuple(axes))


def mesh_from_settings(mesh_block, devices=None) -> Mesh:
    """The Mesh of a config.mesh block (ldm_jax/training/mesh_config.py)."""
    axes, shape, dcn, granule = mesh_settings(mesh_block)
    return make_pod_mesh(axes, shape, dcn, granule, devices)


def process_layout(mesh: Mesh) -> np.ndarray:
    """The process_index of each device of `mesh`, in mesh shape (for logs and tests)."""
    return np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
