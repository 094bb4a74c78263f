"""Training checkpoints: an orbax CheckpointManager (async) holding three items per step.

    state   the train state pytree (params, optimizer state, EMA, step), sharded arrays
    data    every process's data-iterator state, {"process_<i>": <JSON value>}, so a resumed run
            sees exactly the batches it would have seen
    config  the run's config as JSON

Only finite states reach `save` (the loop checks the loss first). Orbax writes each step into a
temporary folder and renames it when complete, so a killed run leaves only whole checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

STATE, DATA, CONFIG = "state", "data", "config"


def _allgather_json(value) -> list:
    """Every process's JSON-able `value`, in process order (identity with one process)."""
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
    lengths = np.asarray(lengths).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    rows = zip(gathered, lengths, strict=True)
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in rows]


def _jsonable(value):
    """Iterator states may hold bytes (e.g. grain's DataLoader): store those as latin-1 text."""
    if isinstance(value, bytes):
        return {"__bytes__": value.decode("latin-1")}
    return value


def _from_jsonable(value):
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
        return value["__bytes__"].encode("latin-1")
    return value


class Checkpointer:
    """save(step, state, data_state, config) / restore_latest(target_state) over `directory`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, DATA, CONFIG)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state, config: dict) -> None:
        """Start an async save of step `step`; returns once the arrays are copied off device."""
        gathered = _allgather_json(_jsonable(data_state))
        data = {f"process_{i}": s for i, s in enumerate(gathered)}
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: ocp.args.JsonSave(data),
                    CONFIG: ocp.args.JsonSave(config),
                }
            ),
            force=True,
        )

    def restore(self, step: int, target_state):
        """(state, this process's data state, config) of `step`, with `target_state`'s shardings."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array) else x,
            target_state,
        )
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(abstract),
                    DATA: ocp.args.JsonRestore(),
                    CONFIG: ocp.args.JsonRestore(),
                }
            ),
        )
        data = restored[DATA]
        key = f"process_{jax.process_index()}"
        if len(data) != jax.process_count() or key not in data:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} holds data-iterator states for "
                f"{len(data)} process(es), but this run has {jax.process_count()}: resume with "
                "the same number of processes"
            )
        return restored[STATE], _from_jsonable(data[key]), restored[CONFIG]

    def restore_latest(self, target_state):
        """(step, state, data state, config) of the newest checkpoint, or None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return (step, *self.restore(step, target_state))

    def wait(self) -> None:
        """Block until every pending async save is written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
