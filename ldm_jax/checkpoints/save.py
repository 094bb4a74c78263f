"""`save_checkpoint(contents, destination, format=...)`: the one writer every export goes through
(`LatentDiffusionCheckpoint.save_pretrained` and the converter call it)."""

import os
from collections.abc import Iterable
from pathlib import Path

from ldm_jax.atomic import check_destination
from ldm_jax.checkpoints.compvis.export import COMPVIS_FILE, check_compvis_suffix, save_compvis
from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.diffusers.export import DIFFUSERS_FOLDER, save_diffusers
from ldm_jax.checkpoints.orbax import ORBAX_FOLDER, save_orbax
from ldm_jax.spec import CLIP_TEXT_CONDITIONINGS

EXPORT_FORMATS = ("diffusers", "compvis", "orbax")


def save_checkpoint(
    checkpoint: CheckpointContents,
    destination: str | os.PathLike,
    *,
    format: str,  # noqa: A002 - the name users expect (save_pretrained(..., format=...))
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write `checkpoint` as a diffusers folder, a CompVis .safetensors file or an orbax folder.

    Writes are atomic: on any failure nothing is left at `destination`. An existing destination
    is an error unless `overwrite`, and even then it is replaced only when it is a checkpoint of
    the format written (a .safetensors file; a diffusers folder; an orbax folder) or an empty
    folder. `protect`: paths the destination may not be, contain or lie inside, besides the
    checkpoint's own `source` (where it was loaded from). Rules in `ldm_jax.atomic`.
    """
    protect = (*protect, checkpoint.source)
    if format in ("diffusers", "compvis"):
        _check_exportable_to_torch_tools(checkpoint, format)
    if format == "diffusers":
        return save_diffusers(checkpoint, destination, overwrite=overwrite, protect=protect)
    if format == "compvis":
        return save_compvis(checkpoint, destination, overwrite=overwrite, protect=protect)
    if format == "orbax":
        return save_orbax(checkpoint, destination, overwrite=overwrite, protect=protect)
    raise ValueError(f"unknown export format {format!r}; allowed: {EXPORT_FORMATS}")


def check_save_destination(
    destination: str | os.PathLike,
    *,
    format: str,  # noqa: A002
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike | None] = (),
) -> None:
    """Raise the error `save_checkpoint` would raise for `destination`, before any work (a
    converter checks this before reading its source)."""
    if format == "diffusers":
        kind = DIFFUSERS_FOLDER
    elif format == "compvis":
        kind = COMPVIS_FILE
        check_compvis_suffix(destination)
    elif format == "orbax":
        kind = ORBAX_FOLDER
    else:
        raise ValueError(f"unknown export format {format!r}; allowed: {EXPORT_FORMATS}")
    check_destination(destination, overwrite=overwrite, replaceable=kind, protect=protect)


def _check_exportable_to_torch_tools(checkpoint: CheckpointContents, format: str) -> None:  # noqa: A002
    """diffusers and CompVis run every CLIP text tower causally: a bidirectional one (trained
    from scratch, see CLIPTextConfig.causal) would load there silently and compute another thing."""
    cond = checkpoint.spec.cond_stage
    if cond is not None and cond.kind == "sdxl":
        bidirectional = not all(e.causal for e in cond.config.text_encoders)
    else:
        bidirectional = cond is not None and cond.kind in CLIP_TEXT_CONDITIONINGS
        bidirectional = bidirectional and not cond.config.causal
    if bidirectional:
        raise ValueError(
            f"cannot export to {format}: the text encoder is a bidirectional (causal=False) CLIP "
            "transformer, which diffusers/CompVis would run with a causal mask; allowed: "
            "format='orbax'"
        )
