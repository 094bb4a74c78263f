"""Export a CheckpointContents as one CompVis-layout .safetensors file.

The tensors carry CompVis names (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`) through the exact CompVis key tables, so the file loads wherever an original
Stable Diffusion / LDM checkpoint does. The ModelSpec rides along in the safetensors metadata
(`ldm_jax_spec`), so ldm_jax reloads even unusual architectures without a yaml config.
"""

import json
import os
from pathlib import Path

import safetensors.numpy

from ldm_jax.atomic import Replaceable, atomic_output
from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table
from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.errors import UnsupportedExportError
from ldm_jax.spec import ModelSpec, spec_to_dict

SPEC_METADATA_KEY = "ldm_jax_spec"
# what overwrite may replace: another checkpoint file, never a folder or a file of another kind
COMPVIS_FILE = Replaceable(
    "a .safetensors file", lambda path: path.is_file() and path.suffix == ".safetensors"
)


def check_compvis_suffix(destination: str | os.PathLike) -> Path:
    destination = Path(destination)
    if destination.suffix != ".safetensors":
        raise ValueError(
            f"CompVis export writes a single .safetensors file; got destination {destination} "
            "(pickled .ckpt files are not written: they need torch and execute code on load)"
        )
    return destination


def check_compvis_exportable(spec: ModelSpec) -> None:
    """UnsupportedExportError for a spec CompVis' code cannot run: openaimodel's normalization()
    and the autoencoder's Normalize() are GroupNorm(32) with no setting (none in the yaml either),
    so another group count would load there without error and compute something else."""
    for name, config in (("unet", spec.unet), ("first_stage", spec.first_stage)):
        if config is not None and config.norm_num_groups != 32:
            raise UnsupportedExportError(
                f"cannot export to compvis: {name}.norm_num_groups={config.norm_num_groups}, but "
                "CompVis' networks always use 32 GroupNorm groups; allowed: format='diffusers' "
                "or format='orbax'"
            )


def save_compvis(
    checkpoint: CheckpointContents,
    destination: str | os.PathLike,
    *,
    overwrite=False,
    protect=(),
) -> Path:
    """Write `checkpoint` to `destination` (a .safetensors path), atomically; `overwrite`
    replaces only a .safetensors file, never a `protect`ed path (see `ldm_jax.atomic`)."""
    destination = check_compvis_suffix(destination)
    check_compvis_exportable(checkpoint.spec)
    tensors = compvis_checkpoint_table(checkpoint.spec).to_torch(checkpoint.params)
    metadata = {"format": "pt", SPEC_METADATA_KEY: json.dumps(spec_to_dict(checkpoint.spec))}
    with atomic_output(
        destination, overwrite=overwrite, replaceable=COMPVIS_FILE, protect=protect
    ) as temporary:
        safetensors.numpy.save_file(tensors, str(temporary), metadata=metadata)
    return destination
