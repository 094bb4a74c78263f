"""The public face of checkpoint IO: `LatentDiffusionCheckpoint`, `load_checkpoint`,
`save_checkpoint`.

    ckpt = LatentDiffusionCheckpoint.from_pretrained("v1-5-pruned-emaonly.safetensors")
    ckpt.save_pretrained("out/sd15", format="diffusers")

Readers and writers of each format work on `CheckpointContents`; this module adds the entry points
on top of them, so the import arrows run one way (facade -> load/save -> formats).
"""

import os
from collections.abc import Iterable
from pathlib import Path

from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.load import read_checkpoint
from ldm_jax.checkpoints.save import write_checkpoint


class LatentDiffusionCheckpoint(CheckpointContents):
    """A model spec, its parameter tree and its tokenizer, with the load/save entry points.

    `source`: the local file or folder it was loaded from (None otherwise); saving never
    replaces it or a folder around it."""

    source: Path | None = None

    @classmethod
    def from_pretrained(cls, path_or_id, **kwargs) -> "LatentDiffusionCheckpoint":
        """Load a CompVis file, diffusers folder, orbax folder or hub id (see `load_checkpoint`)."""
        return load_checkpoint(path_or_id, **kwargs)

    def save_pretrained(
        self,
        destination,
        *,
        format: str,  # noqa: A002
        overwrite: bool = False,
        protect: Iterable[str | os.PathLike | None] = (),
    ) -> Path:
        """Write as "diffusers" (folder), "compvis" (.safetensors file) or "orbax" (folder); see
        `save_checkpoint` for `overwrite` and `protect`."""
        return save_checkpoint(
            self, destination, format=format, overwrite=overwrite, protect=protect
        )


def load_checkpoint(path_or_id, **kwargs) -> LatentDiffusionCheckpoint:
    """Read any supported source; keyword arguments as `ldm_jax.checkpoints.load.read_checkpoint`
    (dtype, use_ema, config, prediction_type, tokenizer)."""
    contents = read_checkpoint(path_or_id, **kwargs)
    checkpoint = LatentDiffusionCheckpoint(contents.spec, contents.params, contents.tokenizer)
    if isinstance(path_or_id, str | os.PathLike) and os.path.lexists(path_or_id):
        checkpoint.source = Path(path_or_id)  # protected when saving (see save_checkpoint)
    return checkpoint


def save_checkpoint(
    checkpoint: CheckpointContents,
    destination: str | os.PathLike,
    *,
    format: str,  # noqa: A002 - the name users expect (save_pretrained(..., format=...))
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write `checkpoint` as a diffusers folder, a CompVis .safetensors file or an orbax folder
    (see `ldm_jax.checkpoints.save.write_checkpoint`).

    `overwrite` replaces only a checkpoint of the same format (or an empty folder). The
    destination may not be, contain or lie inside any `protect`ed path, nor the checkpoint's
    `source` (where `load_checkpoint` read it from)."""
    protect = (*protect, getattr(checkpoint, "source", None))
    return write_checkpoint(
        checkpoint, destination, format=format, overwrite=overwrite, protect=protect
    )
