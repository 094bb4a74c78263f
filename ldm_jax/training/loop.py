"""The generic training loop: `run(config, workdir, task) -> RunResult` (with the final state)
for every trainer.

A task owns the model side; the loop owns everything around it:

    task.global_batch_size          int, for samples/s
    task.init_state(rng)            the sharded step-0 state
    task.train_step                 jitted (state, batch, rng) -> (state, metrics), state donated;
                                    metrics holds scalar "loss" (and e.g. grad_norm, learning_rate);
                                    a jitted step or a bound_step.BoundStep (AOT-compiled once)
    task.make_iterator()            global batches; get_state() / set_state(s) with JSON-able s
    task.sample(state, rng)         optional: a uint8 [H, W, 3] grid (EMA params) or None
    task.export(state, workdir)     optional: called after each checkpoint (the last step's too), so
                                    the exports match the newest checkpoint; returns the paths it
                                    wrote (e.g. a LoRA run's adapter files)
    task.hidden_metrics(step)       optional: metric names not worth showing at that step (zero or
                                    constant by the config); metrics.jsonl still gets them all

The loop resumes from the newest checkpoint in `workdir/checkpoints`, folds the step number into
the seed for each step's rng (so a resumed run draws the same noise), logs every `log_every` steps,
checkpoints every `checkpoint_every` steps and at the end, writes sample grids every
`sample_every` steps and at the end, stops cleanly on SIGTERM (finish the step, save, return), and
stops on a NaN/Inf loss without saving that state.

Display (process 0, stderr): a bar labelled "<label> (compiling)" until the first step is done,
then "compiled in N s" once and the training bar (the label, the last loss as postfix), whose
clock, and so its rate and ETA, starts after that first step. Log lines go through the bar
(`tqdm.write`) while it is shown.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from ldm_jax.atomic import atomic_output
from ldm_jax.training import metrics as metrics_lib
from ldm_jax.training.checkpointing import Checkpointer
from ldm_jax.training.config_checks import ConfigError, check_stage


class SetupError(ValueError):
    """Bad input found while building the state or the data iterator (e.g. a missing dataset)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the state of that step was not saved."""


@dataclasses.dataclass
class RunResult:
    step: int  # steps completed (= the last checkpoint's step unless the run stopped on NaN)
    preempted: bool
    metrics: dict
    # the state after the last step (on the devices, sharded); a rerun of a finished run takes no
    # step and returns its last checkpoint's state
    state: Any = None


class _StopSignal:
    """Records SIGTERM so the loop can finish the current step, save and return."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no preemption handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        """True on every process once any process got SIGTERM (hosts must stop at the same step)."""
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils  # noqa: PLC0415

        flags = multihost_utils.process_allgather(np.array([self.received], np.int32))
        return bool(np.asarray(flags).any())


def save_config(config, workdir: Path) -> Path:
    """workdir/config.json, written atomically by process 0."""
    path = workdir / "config.json"
    if jax.process_index() == 0:
        with atomic_output(path, overwrite=True) as temporary:
            temporary.write_text(config_to_json(config), encoding="utf-8")
    return path


def config_to_json(config) -> str:
    if hasattr(config, "to_json_best_effort"):
        return config.to_json_best_effort(indent=2, sort_keys=True)
    return json.dumps(config, indent=2, sort_keys=True, default=str)


def _compile(train_step, state, batch, rng):
    """(callable, FLOPs per device per step): ahead-of-time compile once, reused for every step."""
    if not hasattr(train_step, "lower"):
        return train_step, None
    compiled = train_step.lower(state, batch, rng).compile()
    return compiled, metrics_lib.compiled_flops(compiled)


def _batch_signature(batch) -> tuple:
    """The shapes and dtypes a compiled step is specialised to (aspect-ratio buckets change them
    from batch to batch)."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    return tuple((jax.tree_util.keystr(p), tuple(np.shape(x)), str(getattr(x, "dtype", "")))
                 for p, x in leaves)


def _host_metrics(metrics) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, metrics: dict) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        names = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"non-finite training metrics at step {step} ({names}); stopping without saving this "
            "state. The last checkpoint is from before it; lower optimizer.learning_rate, "
            "set optimizer.grad_clip, or check the data"
        )


def newest_step(workdir) -> int | None:
    """The step of the newest finished checkpoint in workdir/checkpoints (orbax names a finished
    step's folder by its number; unfinished saves carry a suffix), without opening orbax."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]
    return max(steps, default=None)


def is_complete(config, workdir) -> bool:
    """Whether workdir already holds the checkpoint of config.train.num_steps (or a later one)."""
    step = newest_step(workdir)
    return step is not None and step >= int(config.train.num_steps)


def run(config, workdir, task, *, stream=None, label: str | None = None) -> RunResult:
    """Train `task` for config.train.num_steps steps in `workdir`, resuming from its checkpoints.

    `label` names the run on the progress bar (default: config.trainer). A finished workdir takes
    no step and keeps its config.json (the record of what was trained)."""
    train = config.train
    workdir = Path(workdir).absolute()
    try:
        check_stage(config)
    except ConfigError as error:
        raise SetupError(str(error)) from error
    try:  # the data first: a missing dataset is reported before anything is written or compiled
        batches = task.make_iterator()
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise SetupError(str(error)) from error
    workdir.mkdir(parents=True, exist_ok=True)
    if not is_complete(config, workdir):
        save_config(config, workdir)
    main = jax.process_index() == 0
    writer = metrics_lib.MetricWriter(workdir, enabled=main, stream=stream)
    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=int(train.get("keep_checkpoints", 3)),
        async_save=bool(train.get("async_checkpointing", True)),
    )
    debug = train.get("debug", {}) or {}
    rng = jax.random.key(int(config.seed))
    init_rng, step_rng, sample_rng = jax.random.split(rng, 3)
    num_steps = int(train.num_steps)
    config_json = json.loads(config_to_json(config))

    try:
        state = task.init_state(init_rng)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        checkpointer.close()
        writer.close()
        if hasattr(batches, "close"):
            batches.close()
        raise SetupError(str(error)) from error
    start = 0
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        start, state, data_state, _ = restored
        batches.set_state(data_state)
        writer.write_text(f"resumed from {checkpointer.directory / str(start)} (step {start})")

    device = jax.devices()[0]
    peak = metrics_lib.peak_flops_per_device(
        device.device_kind, float(train.get("peak_flops_per_device", 0.0))
    )
    if peak is None and device.platform != "cpu":  # a CPU has no meaningful peak: no MFU, no hint
        writer.write_text(f"MFU: unknown peak FLOP/s for device {device.device_kind!r} "
                          "(set train.peak_flops_per_device)")
    label = label or str(config.get("trainer", "train"))
    show_bar = main and bool(train.get("progress_bar", True))
    hidden_metrics = getattr(task, "hidden_metrics", lambda step: ())
    # until the first step is done: a bar that only says what is happening (compiling)
    bar = _bar(f"{label} (compiling)", num_steps, start, show_bar and start < num_steps,
               leave=False)
    writer.bar = bar if show_bar else None
    compiled = {}  # batch shapes -> (step callable, FLOPs): one compile per bucket shape
    step_fn, flops = None, None
    pending = None  # (step number after it, metrics on device): resolved one step late
    last = {}
    step = start
    log_every = max(1, int(train.get("log_every", 1)))
    checkpoint_every = int(train.get("checkpoint_every", 0))
    sample_every = int(train.get("sample_every", 0))
    window_start, window_steps = None, 0

    def resolve():
        nonlocal pending, last, window_start, window_steps
        if pending is None:
            return
        done, device_metrics = pending
        pending = None
        last = _host_metrics(device_metrics)
        _check_finite(done, last)
        if "loss" in last:
            bar.set_postfix(loss=f"{last['loss']:.4g}", refresh=False)
        window_steps += 1
        if done % log_every == 0 or done == num_steps:
            now = time.perf_counter()
            extra = {}
            if window_start is not None and window_steps > 0 and now > window_start:
                steps_per_second = window_steps / (now - window_start)
                extra["samples_per_second"] = steps_per_second * task.global_batch_size
                extra["steps_per_second"] = steps_per_second
                extra["mfu"] = metrics_lib.mfu(flops, steps_per_second, peak)
            writer.write_scalars(done, {**last, **extra}, hidden=hidden_metrics(done))
            window_start, window_steps = now, 0

    try:
        with _StopSignal() as stop:
            preempted = False
            while step < num_steps:
                batch = next(batches)
                rng_i = jax.random.fold_in(step_rng, step)
                first = step_fn is None
                signature = _batch_signature(batch)
                if signature not in compiled:
                    compile_start = time.perf_counter()
                    compiled[signature] = _compile(task.train_step, state, batch, rng_i)
                    compile_end = time.perf_counter()
                    if not first:
                        shapes = ", ".join(f"{k} {list(v)}" for k, v, _ in signature)
                        writer.write_text(f"{label}: compiled for batch shapes {shapes} in "
                                          f"{compile_end - compile_start:.1f} s")
                step_fn, flops = compiled[signature]
                state, device_metrics = step_fn(state, batch, rng_i)
                resolve()  # the previous step's metrics, while this one runs
                if first:  # time (samples/s, the bar's ETA) from the end of the first step
                    jax.block_until_ready(device_metrics)
                    window_start, window_steps = time.perf_counter(), -1
                    # AOT: the compile alone; a plain callable compiles inside its first call
                    aot = hasattr(task.train_step, "lower")
                    took = (compile_end if aot else window_start) - compile_start
                    bar.close()
                    writer.bar = None
                    per_step = f", {flops:.4g} FLOPs per device per step" if flops else ""
                    writer.write_text(f"{label}: compiled in {took:.1f} s{per_step}")
                    bar = _bar(label, num_steps, step + 1, show_bar, leave=True)
                    writer.bar = bar if show_bar else None
                else:
                    bar.update(1)
                pending = (step + 1, device_metrics)
                step += 1
                _debug_hooks(debug, step, checkpointer)
                preempted = stop.any_process()
                if preempted or step == num_steps or (
                    checkpoint_every and step % checkpoint_every == 0
                ):
                    resolve()  # never save a non-finite state
                    checkpointer.save(step, state, batches.get_state(), config_json)
                    for path in getattr(task, "export", lambda *a: [])(state, workdir):
                        writer.write_text(f"step {step}: wrote {path}")
                if (sample_every and (step % sample_every == 0 or step == num_steps)
                        and hasattr(task, "sample")):
                    grid = task.sample(state, jax.random.fold_in(sample_rng, step))
                    if grid is not None:
                        path = writer.write_image(step, "samples", np.asarray(grid))
                        if path is not None:
                            writer.write_text(f"step {step}: sample grid {path}")
                if preempted:
                    writer.write_text(f"SIGTERM: saved step {step}, exiting")
                    break
            resolve()
        checkpointer.wait()
        return RunResult(step=step, preempted=preempted, metrics=last, state=state)
    finally:
        bar.close()
        writer.bar = None
        checkpointer.close()
        writer.close()
        if hasattr(batches, "close"):  # grain prefetch threads / worker processes
            batches.close()


def _bar(label: str, total: int, initial: int, shown: bool, *, leave: bool):
    """A tqdm bar on stderr; its clock (rate, ETA) starts now, counting from `initial`."""
    return tqdm(total=total, initial=initial, desc=label, unit="step", file=sys.stderr,
                leave=leave, disable=not shown, dynamic_ncols=True)


def _debug_hooks(debug, step: int, checkpointer: Checkpointer) -> None:
    """Fault injection for the tests: a real SIGKILL / SIGTERM to this process after `step`.

    Before the SIGKILL the in-flight async saves are awaited, so which checkpoint survives is
    deterministic; nothing else gets a chance to run (no final save, no clean-up).
    """
    if int(debug.get("kill_at_step", -1)) == step:
        checkpointer.wait()
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if int(debug.get("sigterm_at_step", -1)) == step:
        os.kill(os.getpid(), signal.SIGTERM)
