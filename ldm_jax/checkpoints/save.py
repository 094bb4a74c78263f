"""`save_checkpoint(checkpoint, destination, format=...)`: the one export entry point."""

import os
from pathlib import Path

from ldm_jax.checkpoints.spec import LatentDiffusionCheckpoint

EXPORT_FORMATS = ("diffusers", "compvis", "orbax")


def save_checkpoint(
    checkpoint: LatentDiffusionCheckpoint,
    destination: str | os.PathLike,
    *,
    format: str,  # noqa: A002 - the name users expect (save_pretrained(..., format=...))
    overwrite: bool = False,
) -> Path:
    """Write `checkpoint` as a diffusers folder, a CompVis .safetensors file or an orbax folder.

    Writes are atomic: on any failure nothing is left at `destination`; an existing destination
    is an error unless `overwrite`.
    """
    if format == "diffusers":
        from ldm_jax.checkpoints.export_diffusers import save_diffusers  # noqa: PLC0415

        return save_diffusers(checkpoint, destination, overwrite=overwrite)
    if format == "compvis":
        from ldm_jax.checkpoints.export_compvis import save_compvis  # noqa: PLC0415

        return save_compvis(checkpoint, destination, overwrite=overwrite)
    if format == "orbax":
        from ldm_jax.checkpoints.orbax_io import save_orbax  # noqa: PLC0415

        return save_orbax(checkpoint, destination, overwrite=overwrite)
    raise ValueError(f"unknown export format {format!r}; allowed: {EXPORT_FORMATS}")
