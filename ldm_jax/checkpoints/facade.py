"""The public face of checkpoint IO: `LatentDiffusionCheckpoint`, `load_checkpoint`,
`save_checkpoint`.

    ckpt = LatentDiffusionCheckpoint.from_pretrained("v1-5-pruned-emaonly.safetensors")
    ckpt.save_pretrained("out/sd15", format="diffusers")

Readers and writers of each format work on `CheckpointContents`; this module adds the entry points
on top of them, so the import arrows run one way (facade -> load/save -> formats).
"""

import os
from pathlib import Path

from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.load import read_checkpoint
from ldm_jax.checkpoints.save import write_checkpoint


class LatentDiffusionCheckpoint(CheckpointContents):
    """A model spec, its parameter tree and its tokenizer, with the load/save entry points."""

    @classmethod
    def from_pretrained(cls, path_or_id, **kwargs) -> "LatentDiffusionCheckpoint":
        """Load a CompVis file, diffusers folder, orbax folder or hub id (see `load_checkpoint`)."""
        return load_checkpoint(path_or_id, **kwargs)

    def save_pretrained(self, destination, *, format: str, overwrite: bool = False) -> Path:  # noqa: A002
        """Write as "diffusers" (folder), "compvis" (.safetensors file) or "orbax" (folder)."""
        return save_checkpoint(self, destination, format=format, overwrite=overwrite)


def load_checkpoint(path_or_id, **kwargs) -> LatentDiffusionCheckpoint:
    """Read any supported source; keyword arguments as `ldm_jax.checkpoints.load.read_checkpoint`
    (dtype, use_ema, config, prediction_type, tokenizer)."""
    contents = read_checkpoint(path_or_id, **kwargs)
    return LatentDiffusionCheckpoint(contents.spec, contents.params, contents.tokenizer)


def save_checkpoint(
    checkpoint: CheckpointContents,
    destination: str | os.PathLike,
    *,
    format: str,  # noqa: A002 - the name users expect (save_pretrained(..., format=...))
    overwrite: bool = False,
) -> Path:
    """Write `checkpoint` as a diffusers folder, a CompVis .safetensors file or an orbax folder
    (see `ldm_jax.checkpoints.save.write_checkpoint`)."""
    return write_checkpoint(checkpoint, destination, format=format, overwrite=overwrite)
