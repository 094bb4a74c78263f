"""Checkpoint IO: load CompVis files, diffusers folders, hub ids and orbax folders; export back.

`LatentDiffusionCheckpoint.from_pretrained(...)` / `.save_pretrained(..., format=...)` are the
entry points; conversions go through exact key tables (`key_table.KeyTable`).
"""

from ldm_jax.checkpoints.spec import (
    CondStageSpec,
    DiffusionSpec,
    LatentDiffusionCheckpoint,
    ModelSpec,
)

__all__ = ["CondStageSpec", "DiffusionSpec", "LatentDiffusionCheckpoint", "ModelSpec"]
