"""The public face of checkpoint IO: `LatentDiffusionCheckpoint`, `load_checkpoint`,
`save_checkpoint`.

    ckpt = LatentDiffusionCheckpoint.from_pretrained("v1-5-pruned-emaonly.safetensors")
    ckpt.save_pretrained("out/sd15", format="diffusers")

Readers and writers of each format work on `CheckpointContents`; this module adds the entry points
on top of them (`save_checkpoint` is `ldm_jax.checkpoints.save`'s one writer), so the import arrows
run one way (facade -> load/save -> formats).
"""

import os
from collections.abc import Iterable
from pathlib import Path

from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.load import read_checkpoint
from ldm_jax.checkpoints.save import save_checkpoint


class LatentDiffusionCheckpoint(CheckpointContents):
    """A model spec, its parameter tree and its tokenizer (and `source`, where it was loaded
    from), with the load/save entry points."""

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
    local = isinstance(path_or_id, str | os.PathLike) and os.path.lexists(path_or_id)
    return LatentDiffusionCheckpoint(
        contents.spec,
        contents.params,
        contents.tokenizer,
        source=Path(path_or_id) if local else None,  # protected when saving
    )
