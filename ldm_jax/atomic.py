"""Atomic writes: build the output beside its destination, then rename it into place.

A failed or interrupted export leaves nothing at the destination (at most a hidden temporary path,
removed on any Python-level failure).
"""

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


class DestinationExistsError(FileExistsError):
    """The export destination exists and overwriting was not asked for."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(destination: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path (not yet created) to write a file or folder into; on success it is
    renamed to `destination`, on failure removed."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise DestinationExistsError(
            f"destination {destination} already exists; choose a new path, or overwrite it "
            "explicitly (overwrite=True; --overwrite on the command line)"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield temporary
        if not temporary.exists():
            raise RuntimeError(f"nothing was written for {destination}")
        if destination.exists():  # overwrite: move the old one aside until the new one is in
            old = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(destination, old)
            os.replace(temporary, destination)
            _remove(old)
        else:
            os.replace(temporary, destination)
    except BaseException:
        _remove(temporary)
        raise
