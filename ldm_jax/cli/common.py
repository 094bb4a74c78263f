"""What every command shares: one ``error:`` line and exit status 2 for bad input, the sampler
names, checkpoint checks and the pipeline cache.

Imports stay light (no jax) so ``--help`` and argument errors answer at once; the pipeline is
imported when a command loads one.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ldm_jax.sampler_options import ALL_SAMPLER_NAMES, canonical_sampler

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # argparse's own status for usage errors
# --sampler's names (canonical and aliases) -> the ldm_jax.diffusion.SAMPLERS key, from the one
# table of ldm_jax.sampler_options (no jax: importing ldm_jax.diffusion would import it)
SAMPLERS = {name: canonical_sampler(name) for name in ALL_SAMPLER_NAMES}
# what loading a checkpoint raises for a bad checkpoint (rather than a bug): reported as bad input
LOAD_ERRORS = (ValueError, OSError, ImportError, KeyError, NotImplementedError)
# as ldm_jax.checkpoints.load.LOCAL_SUFFIXES (tests/test_untrusted_files.py checks they agree)
_LOCAL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".yaml", ".yml")
# the model `python train.py` (the built-in default run) writes: the commands' checkpoint when
# --checkpoint is omitted (relative to the working folder, as the run's workdir)
DEFAULT_CHECKPOINT = Path("runs/default/model")


class UsageError(Exception):
    """Bad command-line input: reported as one ``error:`` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors: one ``error:`` line, not usage + error."""

    def error(self, message):
        raise UsageError(message)


def prog_name(documented: str) -> str:
    """The name ``--help`` shows: the console script's (``ldm-jax-...``) when run as one, else the
    documented command (``python sample.py``)."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("ldm-jax-") else documented


def run_command(parser: argparse.ArgumentParser, command: Callable[..., int], argv=None) -> int:
    """``command(args)``'s exit status; a UsageError anywhere is printed as one line, status 2."""
    try:
        return command(parser.parse_args(argv))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def exists_or_hub_id(checkpoint: str) -> bool:
    """True for an existing path or something shaped like a hub id ("org/name")."""
    if Path(checkpoint).expanduser().exists():
        return True
    parts = checkpoint.split("/")
    local_looking = checkpoint.startswith((".", "/", "~")) or "\\" in checkpoint
    local_looking = local_looking or checkpoint.lower().endswith(_LOCAL_SUFFIXES)
    return len(parts) == 2 and all(parts) and not local_looking


def require_checkpoint(checkpoint: str, *, hint: str, hub_ids: bool = True) -> None:
    """UsageError ``checkpoint ... not found: {hint}`` unless it exists (or looks like a hub id)."""
    found = exists_or_hub_id(checkpoint) if hub_ids else Path(checkpoint).expanduser().exists()
    if not found:
        raise UsageError(f"checkpoint {checkpoint!r} not found: {hint}")


def default_checkpoint(accepted: str) -> str:
    """The default run's model, for a command given no --checkpoint; UsageError saying how to get
    it (or what to pass instead: `accepted`) when it is not there."""
    if not DEFAULT_CHECKPOINT.is_dir():
        raise UsageError(
            f"--checkpoint is required when there is no default model ({DEFAULT_CHECKPOINT}): "
            f"run `python train.py` first to train it, or pass {accepted}"
        )
    return str(DEFAULT_CHECKPOINT)


def check_number(check: Callable, value, flag: str):
    """``check(value, flag)`` (an ldm_jax.sampler_options check) with its ValueError as a
    UsageError: the same rule as the pipeline's, named by the flag."""
    try:
        return check(value, flag)
    except ValueError as error:
        raise UsageError(str(error)) from error


def check_creatable(path, flag: str) -> None:
    """UsageError unless a missing ``path`` can be created: its first existing ancestor must be a
    writable folder. Refuses now what would fail only after the work (``--out <file>/sub``); an
    existing ``path`` is left to the caller's rules."""
    path = Path(path)  # as the writer will open it (no ~ expansion)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing == path:
        return
    if not existing.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be created: {existing} is not writable")


def check_output_folder(out: str, names, overwrite: bool) -> None:
    """UsageError unless ``out`` can be (or is) a folder to write ``names`` into: not a file, not
    under one, writable, and holding none of them (unless ``overwrite``; never a folder of one of
    the names, which no write could replace)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    check_creatable(path, "--out")
    if not path.is_dir():
        return
    folders = [n for n in names if (path / n).is_dir()]
    if folders:
        raise UsageError(f"{out} holds folders named {', '.join(folders)}; choose another --out")
    taken = [n for n in names if (path / n).exists()]
    if taken and not overwrite:
        raise UsageError(
            f"{out} already holds {', '.join(taken)}; pass --overwrite or another --out"
        )


def load_pipeline(
    checkpoint: str,
    dtype: str = "float32",
    compilation_cache: str | None = None,
    attention: str = "auto",
    *,
    slot: str = "model",
):
    """The LatentDiffusionPipeline of a checkpoint, kept for the next command in this process
    (notebooks, tests: no reload, no recompile); UsageError naming the checkpoint if unreadable.
    ``slot``: which cache keeps it, one pipeline each: "model" (--checkpoint) or "refiner"
    (sample.py --refiner, kept beside the base)."""
    try:
        path = Path(checkpoint).expanduser()
        # a local checkpoint is known by its absolute path and modification time: the same
        # relative name in another folder, or a model retrained in place, is loaded afresh
        version = None
        if path.exists():
            path, version = path.resolve(), path.stat().st_mtime_ns
        return _SLOTS[slot](str(path), version, dtype, compilation_cache, attention)
    except LOAD_ERRORS as error:
        raise UsageError(f"cannot load checkpoint {checkpoint!r}: {error}") from error


@functools.lru_cache(maxsize=1)
def _cached_pipeline(checkpoint: str, version, dtype: str, compilation_cache: str | None,
                     attention: str):  # fmt: skip
    """Keyed by (checkpoint, its version, dtype, compilation cache, attention), passed
    positionally."""
    import jax.numpy as jnp  # noqa: PLC0415 - keep --help and argument errors fast

    from ldm_jax.sampling.pipeline import LatentDiffusionPipeline  # noqa: PLC0415

    return LatentDiffusionPipeline.from_pretrained(
        checkpoint,
        dtype=getattr(jnp, dtype),
        compilation_cache_dir=compilation_cache,
        attention=attention,
    )


_cached_refiner = functools.lru_cache(maxsize=1)(_cached_pipeline.__wrapped__)
_SLOTS = {"model": _cached_pipeline, "refiner": _cached_refiner}


def release_pipeline(slot: str) -> None:
    """Forget the pipeline a cache ``slot`` keeps (its memory is freed once unused)."""
    _SLOTS[slot].cache_clear()
