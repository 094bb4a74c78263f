"""`write_checkpoint(contents, destination, format=...)`: the one writer every export goes through
(`ldm_jax.checkpoints.save_checkpoint` and `save_pretrained` call it)."""

import os
from pathlib import Path

from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.spec import CLIP_TEXT_CONDITIONINGS

EXPORT_FORMATS = ("diffusers", "compvis", "orbax")


def write_checkpoint(
    checkpoint: CheckpointContents,
    destination: str | os.PathLike,
    *,
    format: str,  # noqa: A002 - the name users expect (save_pretrained(..., format=...))
    overwrite: bool = False,
) -> Path:
    """Write `checkpoint` as a diffusers folder, a CompVis .safetensors file or an orbax folder.

    Writes are atomic: on any failure nothing is left at `destination`; an existing destination
    is an error unless `overwrite`.
    """
    if format in ("diffusers", "compvis"):
        _check_exportable_to_torch_tools(checkpoint, format)
    if format == "diffusers":
        from ldm_jax.checkpoints.diffusers.export import save_diffusers  # noqa: PLC0415

        return save_diffusers(checkpoint, destination, overwrite=overwrite)
    if format == "compvis":
        from ldm_jax.checkpoints.compvis.export import save_compvis  # noqa: PLC0415

        return save_compvis(checkpoint, destination, overwrite=overwrite)
    if format == "orbax":
        from ldm_jax.checkpoints.orbax import save_orbax  # noqa: PLC0415

        return save_orbax(checkpoint, destination, overwrite=overwrite)
    raise ValueError(f"unknown export format {format!r}; allowed: {EXPORT_FORMATS}")


def _check_exportable_to_torch_tools(checkpoint: CheckpointContents, format: str) -> None:  # noqa: A002
    """diffusers and CompVis run every CLIP text tower causally: a bidirectional one (trained
    from scratch, see CLIPTextConfig.causal) would load there silently and compute another thing."""
    cond = checkpoint.spec.cond_stage
    if cond is not None and cond.kind in CLIP_TEXT_CONDITIONINGS and not cond.config.causal:
        raise ValueError(
            f"cannot export to {format}: the text encoder is a bidirectional (causal=False) CLIP "
            "transformer, which diffusers/CompVis would run with a causal mask; allowed: "
            "format='orbax'"
        )
