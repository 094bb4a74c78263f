"""config.trainer -> task factory: the trainers `python train.py` knows.

A factory is `make_task(config) -> task` (see ldm_jax/training/loop.py for the task interface;
"default" returns a multi-stage run with its own `run(workdir)`). A new trainer is one more entry;
tests add their own by passing `tasks={**TASKS, name: factory}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ldm_jax.training import autoencoder_task, default_task, ldm_task, loop

TASKS: dict[str, Callable] = {
    "ldm": ldm_task.make_task,
    "autoencoder": autoencoder_task.make_task,
    "default": default_task.make_task,
}


def make_task(config, tasks: Mapping[str, Callable] = TASKS):
    """The task for config.trainer; an unknown name is one clear error listing the known ones."""
    name = config.get("trainer", None)
    if name not in tasks:
        raise ValueError(f"unknown config.trainer {name!r}; allowed: {', '.join(sorted(tasks))}")
    return tasks[name](config)


def completed_run(config, workdir) -> str | None:
    """The line to print when `workdir` already holds the finished run of `config` (its last
    checkpoint at train.num_steps; the default run: both stages, the model and the grid), else
    None. A finished run is reported, never redone: its exports and config.json stay as trained."""
    if config.get("trainer", None) == "default":
        if default_task.is_complete(config, workdir):
            return default_task.completion_message(config, workdir)
        return None
    if not loop.is_complete(config, workdir):
        return None
    step = loop.newest_step(workdir)
    return (f"the run in {workdir} is already complete (checkpoint step {step}, "
            f"train.num_steps={int(config.train.num_steps)}); nothing to do. Raise "
            "--config.train.num_steps to train on, or use another --workdir")
