"""The setup every task starts with: the device mesh of the config and the global batch checked
against it. Its own module so the task modules and the task table (tasks.py) import it without a
cycle."""

from __future__ import annotations

from ldm_jax.training.mesh import mesh_from_settings
from ldm_jax.training.sharding import data_parallel_size


def mesh_from_config(config):
    """The device Mesh of config.mesh: axes, shape (within a slice), dcn_shape (slices),
    process_is_granule (ldm_jax/training/mesh_config.py)."""
    return mesh_from_settings(config.mesh)


def check_global_batch(global_batch_size: int, mesh) -> int:
    """The global batch must split evenly over the data-parallel devices; returns the per-device
    batch."""
    dp = data_parallel_size(mesh)
    if global_batch_size < 1:
        raise ValueError(f"data.global_batch_size={global_batch_size} must be >= 1 (a multiple "
                         f"of the data-parallel size {dp})")
    if global_batch_size % dp:
        axes = {a: mesh.shape[a] for a in mesh.axis_names}
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by the data-parallel "
            f"size {dp} (mesh {axes}; batch is split over data x fsdp): use a multiple of {dp}"
        )
    return global_batch_size // dp


def mesh_rules_and_batch(config) -> tuple:
    """(mesh, logical sharding rules, global batch size) of a task's config, the batch checked
    against the mesh."""
    mesh = mesh_from_config(config)
    global_batch_size = int(config.data.global_batch_size)
    check_global_batch(global_batch_size, mesh)
    return mesh, tuple(tuple(r) for r in config.sharding_rules), global_batch_size
