"""Multi-host start-up: `jax.distributed.initialize` when the config names a coordinator.

    config.distributed.coordinator_address  "host:port" ("" = single process, or let JAX detect a
                                            TPU pod / SLURM cluster when `auto` is set)
    config.distributed.num_processes        total processes
    config.distributed.process_id           this process's index
    config.distributed.local_device_ids     optional list of local device ids
    config.distributed.auto                 call initialize() with no arguments (cluster detection)
    config.distributed.cpu_collectives      CPU cross-process collectives ("gloo"); CPU-only runs
                                            need it, accelerators ignore it

Must run before anything touches a jax backend (jax.devices(), arrays, jit).
"""

from __future__ import annotations

import jax
import ml_collections


def distributed_config() -> ml_collections.ConfigDict:
    """The default (single-process) `config.distributed` block."""
    return ml_collections.ConfigDict(
        {
            "coordinator_address": "",
            "num_processes": 1,
            "process_id": 0,
            "local_device_ids": ml_collections.FieldReference(None, field_type=list),
            "auto": False,
            "cpu_collectives": "gloo",
        }
    )


_initialized = False


def maybe_initialize(config) -> bool:
    """Initialise jax.distributed if `config.distributed` asks for it; True when it did."""
    global _initialized
    dist = config.get("distributed")
    if dist is None or _initialized:
        return _initialized
    auto = bool(dist.get("auto", False))
    address = dist.get("coordinator_address", "") or ""
    if not auto and not address:
        return False
    if not auto:
        num, pid = int(dist.num_processes), int(dist.process_id)
        if num < 1 or not 0 <= pid < num:
            raise ValueError(
                f"config.distributed: process_id {pid} must be in [0, num_processes={num})"
            )
    if dist.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    if auto:
        jax.distributed.initialize()
    else:
        local = dist.get("local_device_ids")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(dist.num_processes),
            process_id=int(dist.process_id),
            local_device_ids=list(local) if local else None,
        )
    _initialized = True
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0
