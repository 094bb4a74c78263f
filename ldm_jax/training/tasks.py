"""config.trainer -> task factory, and the checks every task shares.

A factory is `make_task(config) -> task` (see ldm_jax/training/loop.py for the task interface).
Factories are imported lazily so a trainer's dependencies load only when it is used.
"""

from __future__ import annotations

import importlib

from ldm_jax.training.sharding import data_parallel_size, make_mesh

TASKS = {
    "ldm": "ldm_jax.training.ldm_task:make_task",
    "autoencoder": "ldm_jax.training.autoencoder_task:make_task",
    "default": "ldm_jax.training.default_task:make_task",
    "toy_regression": "ldm_jax.training.toy_task:make_task",
}


def make_task(config):
    """The task for config.trainer; an unknown name is one clear error listing the known ones."""
    name = config.get("trainer", None)
    if name not in TASKS:
        raise ValueError(f"unknown config.trainer {name!r}; allowed: {', '.join(sorted(TASKS))}")
    module_name, attr = TASKS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ValueError(f"trainer {name!r} is not available in this version ({module_name} "
                         "is missing)") from None
    return getattr(module, attr)(config)


def mesh_from_config(config):
    """The device Mesh of config.mesh (axes, shape with one -1 = the rest)."""
    return make_mesh(tuple(config.mesh.axes), tuple(config.mesh.shape))


def check_global_batch(global_batch_size: int, mesh) -> int:
    """The global batch must split evenly over the data-parallel devices; returns the per-device
    batch."""
    dp = data_parallel_size(mesh)
    if global_batch_size < 1 or global_batch_size % dp:
        axes = {a: mesh.shape[a] for a in mesh.axis_names}
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by the data-parallel "
            f"size {dp} (mesh {axes}; batch is split over data x fsdp): use a multiple of {dp}"
        )
    return global_batch_size // dp


def mesh_rules_and_batch(config) -> tuple:
    """(mesh, logical sharding rules, global batch size) of a task's config, the batch checked
    against the mesh: the setup every task starts with."""
    mesh = mesh_from_config(config)
    global_batch_size = int(config.data.global_batch_size)
    check_global_batch(global_batch_size, mesh)
    return mesh, tuple(tuple(r) for r in config.sharding_rules), global_batch_size
