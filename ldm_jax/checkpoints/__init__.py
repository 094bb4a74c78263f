"""Checkpoint IO: load CompVis files, diffusers folders, hub ids and orbax folders; export back.

`LatentDiffusionCheckpoint.from_pretrained(...)` / `.save_pretrained(..., format=...)` (or
`load_checkpoint` / `save_checkpoint`) are the entry points; every conversion goes through an
exact key table (`key_table.KeyTable`). Layout: `compvis/` and `diffusers/` hold one format each
(key tables, architecture detection, export), `orbax.py` the native format, `errors.py` every
error raised here. The model description itself is `ldm_jax.spec`.
"""

from ldm_jax.checkpoints.facade import (
    LatentDiffusionCheckpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["LatentDiffusionCheckpoint", "load_checkpoint", "save_checkpoint"]
