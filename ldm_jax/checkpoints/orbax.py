"""orbax folders: the parameter tree as an orbax checkpoint plus the ModelSpec as JSON.

Layout: <dir>/ldm_spec.json, <dir>/params/ (orbax StandardCheckpointer), and <dir>/tokenizer/
when the checkpoint has a tokenizer that can write itself. Restoring accepts shardings, so a
checkpoint can be read straight onto a device mesh (each host reads only its shards).
"""

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ldm_jax.atomic import atomic_output, folder_kind
from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.errors import OrbaxCheckpointError
from ldm_jax.checkpoints.tokenizer import tokenizer_for_spec
from ldm_jax.models.factory import abstract_checkpoint_params
from ldm_jax.spec import spec_from_dict, spec_to_dict

SPEC_FILE = "ldm_spec.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"



def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / SPEC_FILE).is_file() and (path / PARAMS_DIR).is_dir()


# what overwrite may replace: another ldm_jax orbax folder, never an unrelated folder
ORBAX_FOLDER = folder_kind(
    f"an ldm_jax orbax checkpoint folder (with {SPEC_FILE} and {PARAMS_DIR}/)",
    is_orbax_checkpoint,
)


def save_orbax(
    checkpoint: CheckpointContents,
    destination: str | os.PathLike,
    *,
    overwrite=False,
    protect=(),
) -> Path:
    """Write `checkpoint` as an orbax folder at `destination` (atomically); `overwrite` replaces
    only an orbax folder, never a `protect`ed path (see `ldm_jax.atomic`)."""
    with atomic_output(
        destination, overwrite=overwrite, replaceable=ORBAX_FOLDER, protect=protect
    ) as temporary:
        temporary.mkdir()
        # closing the checkpointer joins its background writer before the folder is renamed
        # (or removed, when the save failed)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(temporary.absolute() / PARAMS_DIR, checkpoint.params)
            checkpointer.wait_until_finished()
        spec_json = json.dumps(spec_to_dict(checkpoint.spec), indent=1)
        (temporary / SPEC_FILE).write_text(spec_json)
        if hasattr(checkpoint.tokenizer, "write_folder"):
            checkpoint.tokenizer.write_folder(temporary / TOKENIZER_DIR)
    return Path(destination)


def read_spec(path: str | os.PathLike):
    path = Path(path)
    if not is_orbax_checkpoint(path):
        raise OrbaxCheckpointError(
            f"{path} is not an ldm_jax orbax checkpoint (expected {SPEC_FILE} and {PARAMS_DIR}/)"
        )
    try:
        return spec_from_dict(json.loads((path / SPEC_FILE).read_text()))
    except (json.JSONDecodeError, ValueError, TypeError) as error:
        raise OrbaxCheckpointError(f"{path / SPEC_FILE} is not a valid spec: {error}") from error


def restore_orbax(
    path: str | os.PathLike, *, shardings: Any = None, dtype=None
) -> CheckpointContents:
    """Read an orbax folder written by `save_orbax`.

    `shardings`: None (default device), one `jax.sharding.Sharding` for every parameter, or a
    pytree of shardings shaped like the parameters. `dtype` converts floating parameters.
    """
    path = Path(path)
    spec = read_spec(path)
    abstract = abstract_checkpoint_params(spec)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s),
        abstract,
        shardings,
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path.absolute() / PARAMS_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise OrbaxCheckpointError(
            f"{path / PARAMS_DIR} does not hold the parameters its spec describes: {error}"
        ) from error
    return CheckpointContents(spec, params, _saved_tokenizer(path / TOKENIZER_DIR, spec))


def _saved_tokenizer(folder: Path, spec):
    """The tokenizer written beside the params (keeping the text encoder's context length);
    None when the folder has none (models without text, or a tokenizer that cannot save)."""
    return tokenizer_for_spec(spec, folder) if folder.is_dir() else None
