"""Training from the shell: the logic behind ``python train.py``.

    python train.py --config configs/<experiment>.py[:arg] --workdir runs/x [--config.key=value]
    python train.py      # no --config: the built-in default (configs/default.py, runs/default)

The same command runs on one CPU, one GPU, or every host of a TPU pod (set config.distributed.* or
config.distributed.auto on pods). A --workdir holding checkpoints resumes. Exit status: 0 done or
preempted (SIGTERM: the step is finished and saved), 1 NaN/Inf loss (that state is not saved),
2 bad input (unknown config key or out-of-range value, missing dataset, batch not divisible by
the data-parallel size, a positional argument, a --workdir that is a file). The whole config (every
stage, sampling settings included) is checked before any data is read, compiled or written; a
workdir that already holds the finished run says so and changes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from ldm_jax.cli.common import EXIT_BAD_INPUT

EXIT_NON_FINITE = 1
# configs/ sits beside train.py in the repository (it is not part of the package)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.py"


def _error(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")
USAGE = """usage: python train.py [--config FILE.py[:ARG]] [--workdir DIR] [--config.KEY=VALUE ...]

flags:
  --config FILE.py[:ARG]   experiment config file (default: configs/default.py, the built-in run);
                           ARG is passed to its get_config()
  --workdir DIR            run folder; a folder holding checkpoints resumes (default: the
                           config's workdir_default)
  --config.KEY=VALUE       override one config value, e.g. --config.train.num_steps=100
  -h, --help               this text and the config file's description
"""


def _help(path: str) -> str:
    from ldm_jax.training.config_overrides import config_docstring  # noqa: PLC0415

    return f"{USAGE}\nconfig file {path}:\n\n{config_docstring(path)}\n"


def main(argv: list[str] | None = None, *, tasks: Mapping[str, Callable] | None = None) -> int:
    """Train the config's task (`tasks`: config.trainer -> factory, default
    ldm_jax.training.tasks.TASKS); argv[0] is the program name, as in sys.argv."""
    argv = list(sys.argv if argv is None else argv)
    from absl import flags  # noqa: PLC0415 - keep argument errors free of jax start-up
    from ml_collections import config_flags  # noqa: PLC0415

    from ldm_jax.training import config_checks, config_overrides  # noqa: PLC0415

    path, arg = config_overrides.config_path_and_arg(argv[1:])
    if any(token in HELP_FLAGS for token in argv[1:]):
        print(_help(path or str(DEFAULT_CONFIG)), end="", flush=True)
        return 0
    if path is None:  # `python train.py`: the built-in default run (configs/default.py)
        path = str(DEFAULT_CONFIG)
        argv = [argv[0], f"--config={path}", *argv[1:]]
    try:
        config_overrides.check_override_keys(
            config_overrides.load_config(path, arg), config_overrides.override_keys(argv[1:])
        )
    except config_overrides.OverrideError as error:
        return _error(str(error), EXIT_BAD_INPUT)

    values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", flag_values=values, help_string="experiment config file", sys_argv=argv
    )
    workdir_flag = flags.DEFINE_string("workdir", None, "run folder (resumes if it has "
                                       "checkpoints)", flag_values=values)
    try:
        positional = values(argv)[1:]
    except Exception as error:  # noqa: BLE001 - absl/ml_collections raise assorted types
        return _error(str(error).strip().splitlines()[-1], EXIT_BAD_INPUT)
    if positional:
        return _error(f"unexpected argument {positional[0]!r}: train.py takes only flags (a "
                      "config is --config FILE.py[:ARG]; see --help)", EXIT_BAD_INPUT)
    config = config_flag.value
    workdir = workdir_flag.value or config.get("workdir_default", None)
    if not workdir:
        return _error("missing --workdir (and the config has no workdir_default)", EXIT_BAD_INPUT)
    try:
        config_checks.check_config(config)
        config_checks.check_workdir(workdir)
    except config_checks.ConfigError as error:
        return _error(str(error), EXIT_BAD_INPUT)

    from ldm_jax.training import distributed, loop  # noqa: PLC0415
    from ldm_jax.training import tasks as task_table  # noqa: PLC0415

    done = task_table.completed_run(config, workdir)
    if done is not None:
        print(done, flush=True)
        return 0
    try:
        distributed.maybe_initialize(config)
        task = task_table.make_task(config, task_table.TASKS if tasks is None else tasks)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        return _error(str(error), EXIT_BAD_INPUT)
    try:
        # a multi-stage task (config.trainer "default") runs its own loops
        result = task.run(workdir) if hasattr(task, "run") else loop.run(config, workdir, task)
    except loop.SetupError as error:
        return _error(str(error), EXIT_BAD_INPUT)
    except loop.NonFiniteLossError as error:
        return _error(str(error), EXIT_NON_FINITE)
    if result.preempted:
        print(f"preempted at step {result.step}; rerun the same command to resume", flush=True)
    return 0
